"""The app's settings (`AppConfig`, which the `chatexaonepath app` options map onto) and per-request generation settings.

Every limit the page shows is also enforced here, on the server, because a scripted client does
not go through the page: question and system-prompt length, answer tokens, temperature, and the
budgets on what one upload may cost (pixels decoded at once, patches, zip members, disk, sessions).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..constants import MAX_CASE_SLIDES
from ..errors import ChatEXAONEPathError
from ..vision_tower.slide import DEFAULT_MAX_PIXELS, SlideLimits

GB = 1024**3
HARD_MAX_NEW_TOKENS = 4096


@dataclass(frozen=True)
class UploadLimits:
    """What one upload may hold (uploads.py checks it)."""

    max_bytes: int  # one upload, and the unpacked contents of a zip
    max_session_bytes: int  # everything in one session's folder, this upload included
    max_zip_members: int = 2_000
    max_zip_depth: int = 8


@dataclass
class AppConfig:
    """Settings of the chat app; docs/app.md ("Serving a lab") says why each limit has its default."""

    model: str | None = None  # a trained checkpoint folder; None: the demo model (synthetic/demo_model.py), or see `untrained`
    untrained: bool = False  # without `model`: an untrained tower around `llm` instead of the demo model
    demo_seed: int = 0  # the demo build's first seed (its cohort and training); another seed is another build
    llm: str = "embedded"  # LLM when no checkpoint is given: HF id, path or "embedded"
    encoder: str | None = None  # None: exaonepath when its weights are found, else random-vit-b16
    encoder_weights: str | None = None
    stain_norm: str | None = None  # None: what the checkpoint was trained on (chat/provenance.py)
    stain_target: str | None = None  # Macenko target image; None: the checkpoint's, when still at its path
    allow_feature_mismatch: bool = False  # serve features unlike the training ones; the banner says so
    device: str = "auto"
    max_upload_gb: float = 4.0
    concurrency: int = 1  # model calls at once (Gradio queue limit and engine semaphore)
    max_new_tokens: int = 256  # the advanced panel's starting value
    temperature: float = 0.0
    top_patches: int = 8
    example: bool = True  # offer the bundled synthetic slide, its features prepared in the background
    example_size: int = 6144  # level-0 side of the example at 0.25 µm/px: ~80 patches
    features_dir: str | None = None  # feature cache; None: the user cache (shared with `chatexaonepath chat`)
    # -- what one upload may cost ---------------------------------------------------------------------
    max_pixels: int = DEFAULT_MAX_PIXELS  # decoded at once: a whole PNG/JPEG (~4 bytes each), a TIFF strip or tile
    max_patches_per_slide: int = 200_000  # bounds the time a load holds the model
    max_level_pixels: int = 2_000_000_000  # area of a slide's smallest level, which the tissue map reads whole
    max_zip_members: int = 2_000  # a MIRAX or DICOM slide has tens to hundreds of files
    max_zip_depth: int = 8  # folder levels inside a zip
    max_session_gb: float = 8.0  # disk per session: every slide of its case plus the one being uploaded
    # -- what one case may cost (a case: the slides of one conversation, chat/session.py) ----------------
    max_case_slides: int = MAX_CASE_SLIDES  # slides in one conversation (the model takes at most MAX_CASE_SLIDES)
    max_case_patches: int = 400_000  # tissue patches of every slide of a case together: its visual tokens' cost
    # -- sessions and requests -----------------------------------------------------------------------
    max_sessions: int = 16  # live browser sessions; beyond it new visitors are told to come back
    max_sessions_per_client: int = 4  # live sessions of one address, and of one login with --auth
    session_idle_minutes: float = 30.0  # a session without a request for this long is ended
    max_requests_per_minute: int = 20  # model work (loads, questions) per session
    max_question_chars: int = 2_000
    max_system_prompt_chars: int = 4_000
    max_new_tokens_limit: int = 1_024  # the most a request may ask for (the slider's end)
    # -- the /v1 API (webapp/api/): what one key may use; its files are sessions, so the limits above hold too --
    api_max_files_per_key: int = 4  # slides one key holds at once (each a session, counted in --max-sessions)
    api_max_requests_per_key: int = 4  # uploads and completions of one key under way at once
    api_max_tokens_per_minute: int = 20_000  # prompt and answer tokens of one key in any minute
    api_max_requests_in_flight: int = 32  # all keys together: each waits for the model in a thread of its own
    api_max_messages: int = 64  # messages in one chat completion request
    api_max_conversation_chars: int = 32_000  # characters of all its messages together

    def __post_init__(self) -> None:
        if self.untrained and self.model:
            raise ChatEXAONEPathError("--untrained and --model contradict each other; pass one of them.")
        if not self.max_upload_gb > 0:
            raise ChatEXAONEPathError(f"--max-upload-gb must be more than 0, got {self.max_upload_gb}.")
        if self.max_session_gb < self.max_upload_gb:
            raise ChatEXAONEPathError(f"--max-session-gb ({self.max_session_gb:g}) must be at least --max-upload-gb "
                                      f"({self.max_upload_gb:g}).")
        if self.concurrency < 1:
            raise ChatEXAONEPathError(f"--concurrency must be at least 1, got {self.concurrency}.")
        if not 1 <= self.max_new_tokens_limit <= HARD_MAX_NEW_TOKENS:
            raise ChatEXAONEPathError(f"--max-new-tokens-limit must be between 1 and {HARD_MAX_NEW_TOKENS}, "
                                      f"got {self.max_new_tokens_limit}.")
        if not 1 <= self.max_new_tokens <= self.max_new_tokens_limit:
            raise ChatEXAONEPathError(f"--max-new-tokens must be between 1 and {self.max_new_tokens_limit} "
                                      f"(--max-new-tokens-limit), got {self.max_new_tokens}.")
        if not 0.0 <= self.temperature <= 2.0:
            raise ChatEXAONEPathError(f"--temperature must be between 0 and 2, got {self.temperature}.")
        if not 1 <= self.top_patches <= 32:
            raise ChatEXAONEPathError(f"--top-patches must be between 1 and 32, got {self.top_patches}.")
        if self.example_size < 2048:  # smaller synthetic slides hold less tissue than segmentation keeps
            raise ChatEXAONEPathError(f"The example slide must be at least 2048 px wide, got {self.example_size}.")
        for name in ("max_zip_members", "max_zip_depth", "max_sessions", "max_sessions_per_client",
                     "max_requests_per_minute", "max_question_chars", "max_system_prompt_chars",
                     "api_max_files_per_key", "api_max_requests_per_key", "api_max_tokens_per_minute",
                     "api_max_requests_in_flight", "api_max_messages", "api_max_conversation_chars"):
            if getattr(self, name) < 1:
                raise ChatEXAONEPathError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}.")
        if not 1 <= self.max_case_slides <= MAX_CASE_SLIDES:
            raise ChatEXAONEPathError(f"--max-case-slides must be between 1 and {MAX_CASE_SLIDES}, got "
                                      f"{self.max_case_slides}.")
        if self.max_case_patches < 1:
            raise ChatEXAONEPathError(f"--max-case-patches must be at least 1, got {self.max_case_patches}.")
        if not self.session_idle_minutes > 0:
            raise ChatEXAONEPathError(f"--session-idle-minutes must be more than 0, got {self.session_idle_minutes}.")
        self.slide_limits  # noqa: B018 - validates --max-pixels and --max-patches-per-slide now, not at the first upload

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_gb * GB)

    @property
    def max_session_bytes(self) -> int:
        return int(self.max_session_gb * GB)

    @property
    def upload_limits(self) -> UploadLimits:
        """What one upload may hold (size, zip members and depth, the session's disk)."""
        return UploadLimits(self.max_upload_bytes, self.max_session_bytes, self.max_zip_members, self.max_zip_depth)

    @property
    def slide_limits(self) -> SlideLimits:
        """The budgets every slide of the app is opened with."""
        return SlideLimits(max_pixels=self.max_pixels, max_patches=self.max_patches_per_slide,
                           max_level_pixels=self.max_level_pixels)


@dataclass
class GenerationSettings:
    """Per-request generation settings (the app's advanced panel), checked against the app's limits."""

    temperature: float = 0.0
    max_new_tokens: int = 256
    system_prompt: str | None = None
    seed: int | None = None  # sampling seed (the API's `seed`); reproducible with --concurrency 1

    def __post_init__(self) -> None:
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise ChatEXAONEPathError(f"The seed must be a whole number from 0 to 2**63 - 1, got {self.seed}.")
        if not 0.0 <= self.temperature <= 2.0:
            raise ChatEXAONEPathError(f"Temperature must be between 0 and 2, got {self.temperature}.")
        if not 1 <= int(self.max_new_tokens) <= HARD_MAX_NEW_TOKENS:
            raise ChatEXAONEPathError(f"Max new tokens must be between 1 and {HARD_MAX_NEW_TOKENS}, "
                                      f"got {self.max_new_tokens}.")
        self.max_new_tokens = int(self.max_new_tokens)

    def check(self, config: AppConfig) -> None:
        """Refuse what this server does not allow, whatever the page sent."""
        if self.max_new_tokens > config.max_new_tokens_limit:
            raise ChatEXAONEPathError(f"Max new tokens is {self.max_new_tokens}; this server allows up to "
                                      f"{config.max_new_tokens_limit} (--max-new-tokens-limit).")
        prompt = self.system_prompt or ""
        if len(prompt) > config.max_system_prompt_chars:
            raise ChatEXAONEPathError(f"The system prompt has {len(prompt):,} characters; this server allows up to "
                                      f"{config.max_system_prompt_chars:,} (--max-system-prompt-chars).")
