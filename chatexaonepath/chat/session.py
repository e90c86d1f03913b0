"""A chat about one slide or a case of several: load them once (features cached on disk), then ask, streamed.

Features are cached by slide fingerprint and extraction settings, so asking about the same slide
again — in this process or a later one — never re-extracts; the slide's visual tokens are kept in
memory, so a follow-up question costs only generation. Features made differently from the model's
training features are refused (chat/provenance.py). The attention a slide is shown with is the
projector's pooling weights — what the visual tokens were actually made from — with CLAM's
attention kept as a second view.

A case is 1–8 slides of one patient asked about together: each is pooled by the tower on its own and
its visual tokens follow a label naming it (`Slide 2 (b.svs):`, conversation.label_case), so answers can
say which slide they mean. The conversation lives on the case's first slide (`session.slide.turns`).
"""

from __future__ import annotations

import logging
import threading
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..assets import user_cache_dir
from ..errors import ChatEXAONEPathError
from ..vision_tower.extraction import ExtractConfig, FeatureExtractor
from ..vision_tower.features import SlideFeatures, read_features, settings_match
from ..vision_tower.slide import Slide, open_slide
from .conversation import IMAGE_TOKEN, MAX_CASE_SLIDES, PromptBuilder, Turn, label_case
from .modeling import ChatEXAONEPathConfig, ChatEXAONEPathForCausalLM
from .typicality import SlideTypicality
from .provenance import check_features, provenance_of, serving_extractor, warn_if_unrecorded
from .regions import Evidence, Region, SlideTurn, case_evidence, question_scope, run_tower

logger = logging.getLogger(__name__)


@dataclass
class ChatAnswer:
    """One reply, with the per-patch weights its visual tokens were pooled with (the explanation)."""

    text: str
    attention: torch.Tensor  # (N,) the projector's pooling weights: what the answer's visual tokens used
    coords: torch.Tensor | None  # (N, 2) level-0 top-left of each patch
    new_tokens: int
    seconds: float
    first_token_seconds: float | None = None
    clam_attention: torch.Tensor | None = None  # (N,) CLAM's softmax(a), a second view
    region: Region | None = None  # what the question was about (clipped to the slide); None: the whole slide
    patch_indices: np.ndarray | None = None  # the slide's patches behind a region's answer (rows of `features`)
    evidence: tuple[Evidence, ...] = ()  # the few patches that weighed most in this answer's visual tokens
    prompt_tokens: int = 0  # the prompt's length in the LLM, the slide's visual tokens included
    slide_index: int = 0  # which slide of the case `attention`, `coords` and a region belong to (0-based)
    slides: int = 1  # how many slides the answer saw (the case)


@dataclass
class LoadedSlide:
    """The slide a session talks about."""

    path: Path
    features: SlideFeatures
    visual_tokens: torch.Tensor  # (1, K, d_llm)
    attention: torch.Tensor  # (N,) pooling weights softmax(q·k/√d + a), mean over queries and heads: the heatmap
    extracted: bool  # False when the features came from the cache
    turns: list[Turn] = field(default_factory=list)
    clam_attention: torch.Tensor | None = None  # (N,) CLAM's softmax(a): equal to `attention` only untrained
    feature_warning: str | None = None  # set when features unlike the training ones were allowed
    typicality: SlideTypicality | None = None  # how like the training slides it is (None: the model cannot say)

    @property
    def typicality_warning(self) -> str | None:
        """One sentence when the slide is unlike the model's training slides, else None."""
        return self.typicality.warning if self.typicality is not None else None

    @property
    def name(self) -> str:
        """The slide's file name, as its label names it to the LLM."""
        return self.path.name


# Small LLMs fall into loops ("… involves multiple stages and multiple tests …", 256 tokens of it); these
# guards apply unless the LLM's own generation_config sets its own (a value there wins over ours).
DEFAULT_REPETITION_PENALTY = 1.15
DEFAULT_NO_REPEAT_NGRAM_SIZE = 6
# The prompt goes in as embeddings, so transformers warns that the guards see only the generated tokens:
# that is what is meant (the prompt's image positions have no token id to penalise).
warnings.filterwarnings("ignore", message=r"Passing `(repetition_penalty|no_repeat_ngram_size)` with `inputs_embeds`",
                        category=UserWarning)


def repetition_defaults(llm) -> tuple[float, int]:
    """(repetition_penalty, no_repeat_ngram_size): the LLM's generation_config values when it sets them, else ours."""
    generation = getattr(llm, "generation_config", None)
    penalty = getattr(generation, "repetition_penalty", None)
    ngram = getattr(generation, "no_repeat_ngram_size", None)
    return (float(penalty) if penalty not in (None, 1.0) else DEFAULT_REPETITION_PENALTY,
            int(ngram) if ngram else DEFAULT_NO_REPEAT_NGRAM_SIZE)


class ContextTooLongError(ChatEXAONEPathError):
    """A question (with nothing else of the conversation left to drop) does not fit the LLM's context."""


UNTRAINED_WARNING = ("The vision tower is UNTRAINED (no --model checkpoint): answers do not depend on the slide "
                     "and are not diagnostic. Train one with `chatexaonepath train` or pass --model.")


def load_chat_model(checkpoint: str | Path | None = None, llm: str = "embedded") -> ChatEXAONEPathForCausalLM:
    """A trained checkpoint, or (without one) an untrained tower around `llm`, with a loud warning."""
    if checkpoint is not None:
        try:
            model = ChatEXAONEPathForCausalLM.from_pretrained(checkpoint)
        except FileNotFoundError as e:
            raise ChatEXAONEPathError(f"{checkpoint} is not a complete ChatEXAONEPath checkpoint: {e}.") from e
        except (ValueError, RuntimeError, OSError) as e:  # config validation, weight shapes, unreadable files
            raise ChatEXAONEPathError(f"Could not load the checkpoint {checkpoint}: {str(e).splitlines()[0]}.") from e
        if not model.config.tower_trained:
            logger.warning(UNTRAINED_WARNING)
        else:
            warn_if_unrecorded(model.config.feature_provenance, checkpoint)
        return model
    logger.warning(UNTRAINED_WARNING)
    return ChatEXAONEPathForCausalLM.build(ChatEXAONEPathConfig(llm_name_or_path=llm))


class ChatSession:
    """Multi-turn chat about one slide at a time with a ChatEXAONEPath model."""

    def __init__(self, model: ChatEXAONEPathForCausalLM, extract_config: ExtractConfig | None = None, *,
                 features_dir: str | Path | None = None, extractor: FeatureExtractor | None = None,
                 max_new_tokens: int = 256, temperature: float = 0.0, system_prompt: str | None = None,
                 allow_feature_mismatch: bool = False, repetition_penalty: float | None = None,
                 no_repeat_ngram_size: int | None = None) -> None:
        self.model = model.eval()
        penalty, ngram = repetition_defaults(model.llm)  # None: the LLM's own setting, else the anti-loop default
        self.repetition_penalty = penalty if repetition_penalty is None else repetition_penalty
        self.no_repeat_ngram_size = ngram if no_repeat_ngram_size is None else no_repeat_ngram_size
        self.allow_feature_mismatch = allow_feature_mismatch
        self._extract_config = extract_config  # None: the checkpoint's training settings (`serving_extractor`)
        self.features_dir = Path(features_dir) if features_dir else user_cache_dir() / "features"
        self._extractor = extractor
        self.max_new_tokens, self.temperature = max_new_tokens, temperature
        config = model.config
        self.builder = PromptBuilder(model.tokenizer, num_image_tokens=config.num_visual_tokens,
                                     image_token=config.image_token,
                                     system_prompt=config.system_prompt if system_prompt is None else system_prompt,
                                     style=config.prompt_style)
        self.slides: list[LoadedSlide] = []  # the case: one slide, or up to MAX_CASE_SLIDES

    @property
    def slide(self) -> LoadedSlide | None:
        """The case's first slide (the only one of a single-slide chat); its `turns` are the conversation."""
        return self.slides[0] if self.slides else None

    @slide.setter
    def slide(self, loaded: LoadedSlide | None) -> None:
        self.slides = [] if loaded is None else [loaded]

    @property
    def extractor(self) -> FeatureExtractor:
        """The feature extractor (built on first use: the patch encoder is large)."""
        if self._extractor is None:
            if self._extract_config is None:
                self._extractor, _ = serving_extractor(self.model.config,
                                                       allow_feature_mismatch=self.allow_feature_mismatch)
            else:
                self._extractor = FeatureExtractor(self._extract_config)
        return self._extractor

    @property
    def extract_config(self) -> ExtractConfig:
        """How this session extracts features."""
        return self._extract_config if self._extract_config is not None else self.extractor.config

    # -- slides ----------------------------------------------------------------------------------------
    def load_slide(self, path: str | Path | Slide, mpp: float | None = None,
                   progress: Callable[[int, int], None] | None = None, *, add: bool = False) -> LoadedSlide:
        """Extract (or reuse cached) features of a slide and start a new conversation about it.

        `path` may be a `Slide` the caller has open (and closes), so it is not opened again. With `add` the
        slide joins the current case instead (the conversation goes on).
        """
        if add:
            self._check_room()
        if isinstance(path, Slide):
            opened, path = nullcontext(path), path.path
        else:
            path = Path(path)
            opened = open_slide(path, mpp if mpp is not None else self.extract_config.mpp)
        with opened as slide:
            settings = self.extractor.settings(slide)
            cache = self.features_dir / settings["slide_fingerprint"].split(":")[-1][:32]
            target = cache / f"{slide.slide_id}.h5"
            extracted = not settings_match(target, settings)
            if extracted:
                self.extractor.extract(slide, cache, progress)
        return self.use_features(read_features(target), path, extracted, add=add)

    def load_case(self, paths: list[str | Path], mpp: float | None = None,
                  progress: Callable[[int, int], None] | None = None) -> list[LoadedSlide]:
        """Load the slides of one case (1–8) and start a new conversation about them together."""
        self._check_case_size(len(paths))
        for i, path in enumerate(paths):
            self.load_slide(path, mpp, progress, add=i > 0)
        return list(self.slides)

    def _check_case_size(self, count: int) -> None:
        if not 1 <= count <= MAX_CASE_SLIDES:
            raise ChatEXAONEPathError(f"A case has 1 to {MAX_CASE_SLIDES} slides, got {count}.")

    def _check_room(self) -> None:
        if len(self.slides) >= MAX_CASE_SLIDES:
            raise ChatEXAONEPathError(f"This case already has {MAX_CASE_SLIDES} slides, the most one conversation "
                                      "takes; start a new case for more.")

    def use_features(self, features: SlideFeatures, path: str | Path | None = None,
                     extracted: bool = False, *, add: bool = False) -> LoadedSlide:
        """Start a conversation about a slide whose features are at hand; refuses features unlike the training ones.

        With `add` the slide joins the current case (at most 8 slides) and the conversation goes on. With
        `allow_feature_mismatch` unlike features are used and `LoadedSlide.feature_warning` says why not to.
        """
        if add and self.slides:
            self._check_room()
        path = Path(path if path is not None else features.path or "features")
        warning = check_features(self.model.config.feature_provenance, provenance_of(features.attrs),
                                 f"{path.name}'s features have", allow=self.allow_feature_mismatch)
        with torch.no_grad():
            tower = self.model.get_slide_tokens([features.features.float()])
        typicality = None
        if getattr(self.model, "typicality", None) is not None:
            typicality = self.model.typicality.assess(features.features, self.model.tower.feature_mean.cpu(),
                                                      self.model.tower.feature_std.cpu())
            if not typicality.typical:
                logger.warning("%s: typicality %.2f (> 1: unlike the training slides).", path.name, typicality.score)
        loaded = LoadedSlide(path, features, tower.visual_tokens, tower.pooling_weights[0].float().cpu(),
                             extracted, clam_attention=tower.clam_attention[0].float().cpu(),
                             feature_warning=warning, typicality=typicality)
        if add and self.slides:
            self.slides.append(loaded)
        else:
            self.slides = [loaded]
        return loaded

    def reset(self) -> None:
        """Forget the conversation, keep the slides."""
        if self.slide is not None:
            self.slide.turns.clear()

    # -- asking ----------------------------------------------------------------------------------------
    def _prompt_ids(self, question: str) -> list[int]:
        """Prompt for the next reply; drops the oldest exchanges (never the image) to fit the context."""
        history = list(self.slide.turns)
        limit = getattr(self.model.llm.config, "max_position_embeddings", None) or 4096
        while True:
            turns = history + [Turn("user", question)]
            turns[0] = Turn("user", f"{IMAGE_TOKEN}\n{turns[0].content}")  # the image rides on the first kept turn
            turns = label_case(turns, [s.name for s in self.slides], self.builder.image_token)  # a case: each labelled
            ids = self.builder.build(turns, add_generation_prompt=True).input_ids
            if len(ids) + self.max_new_tokens <= limit:
                return ids
            if not history:
                raise ContextTooLongError(f"The question is too long for the model's context ({len(ids)} prompt tokens "
                                          f"+ {self.max_new_tokens} to generate > {limit}); shorten it.")
            dropped, history = history[:2], history[2:]
            logger.info("Context full: dropped the oldest exchange (%r…)", dropped[0].content[:40])

    def ask(self, question: str, on_text: Callable[[str], None] | None = None,
            region: Region | tuple[int, int, int, int] | str | None = None, slide: int = 0) -> ChatAnswer:
        """Answer `question` about the loaded slide, calling `on_text` with each piece as it is generated.

        `on_text` returning False ends the answer there (a caller's stop sequence), keeping what was generated.

        With `region` (level-0 x, y, width, height) the answer comes from the patches in it only: the tower
        runs on their cached features (chat/regions.py); a region without tissue patches raises
        `EmptyRegionError`. Region and whole-slide questions can alternate; each turn records its scope.
        In a case the region belongs to slide `slide` (0-based); the other slides are seen whole.
        """
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        if self.slide is None:
            raise ChatEXAONEPathError("Load a slide before asking about it.")
        # A literal placeholder in text would be read as a second image; keep it as plain text.
        question = question.strip().replace(self.builder.image_token, "[image]")
        if not question:
            raise ChatEXAONEPathError("The question is empty.")
        if not 0 <= slide < len(self.slides):
            raise ChatEXAONEPathError(f"This case has {len(self.slides)} slide(s); there is no slide {slide + 1}.")
        scopes = [question_scope(loaded, region if i == slide else None)  # checked before anything runs
                  for i, loaded in enumerate(self.slides)]
        scope = scopes[slide]
        input_ids = torch.tensor([self._prompt_ids(question)], device=self.model.device)
        streamer = TextIteratorStreamer(self.model.tokenizer, skip_prompt=False, skip_special_tokens=True)
        sampling = {"do_sample": True, "temperature": self.temperature} if self.temperature > 0 else {"do_sample": False}
        result: dict = {}
        stop = threading.Event()

        class StopWhenAsked(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs) -> bool:
                return stop.is_set()

        def generate() -> None:
            try:
                with torch.no_grad():  # no_grad is per thread: it must be set here
                    tokens = torch.cat([run_tower(s, loaded, self.model).visual_tokens  # a region: its patches only
                                        for s, loaded in zip(scopes, self.slides)])  # (S, K, d)
                    embeds, _ = self.model.merge_visual_tokens(input_ids, tokens, slides_per_sample=[len(scopes)])
                    result["ids"] = self.model.llm.generate(
                        inputs_embeds=embeds, attention_mask=torch.ones_like(input_ids), streamer=streamer,
                        max_new_tokens=self.max_new_tokens, pad_token_id=self.model.tokenizer.pad_token_id,
                        stopping_criteria=StoppingCriteriaList([StopWhenAsked()]),
                        repetition_penalty=self.repetition_penalty, no_repeat_ngram_size=self.no_repeat_ngram_size,
                        **sampling)
            except BaseException as e:  # surfaced in the caller's thread below
                result["error"] = e
                streamer.end()

        started = time.perf_counter()
        worker = threading.Thread(target=generate, daemon=True)
        worker.start()
        pieces, first = [], None
        try:
            for piece in streamer:
                if piece and first is None:
                    first = time.perf_counter() - started
                pieces.append(piece)
                if on_text is not None and piece and on_text(piece) is False:
                    break  # the caller has what it wants: generation stops below, the answer so far is kept
        finally:  # a failing callback (or Ctrl-C) stops generation instead of leaving it running
            stop.set()
            worker.join()
        if "error" in result:
            raise result["error"]
        text = "".join(pieces).strip().replace(self.builder.image_token, "[image]")
        if len(scopes) > 1 and scope.region is None:
            evidence = case_evidence(scopes)  # the heaviest patches of the whole case, each naming its slide
        else:
            evidence = tuple(replace(e, slide=slide) for e in scope.evidence)
        self.slide.turns += [SlideTurn("user", question, scope.region, slide=slide),
                             SlideTurn("assistant", text, scope.region, evidence, slide=slide)]
        return ChatAnswer(text, scope.weights, scope.coords, int(result["ids"].shape[1]), time.perf_counter() - started,
                          first, scope.clam_attention, scope.region, scope.indices, evidence, int(input_ids.shape[1]),
                          slide, len(scopes))
