"""Which features a checkpoint learned from, and the check that it is served features made the same way.

Every features file records how it was made (encoder, the sha256 of its weights, stain normalisation
and the Macenko target, patch size, µm/px). Training writes these settings of its features into the
checkpoint's config as `feature_provenance` (and refuses a mix). Chat, the app and `eval run` take
their extraction defaults from it and refuse features made differently, naming both sides; with
`--allow-feature-mismatch` the refusal becomes a warning that the caller must show. A model trained
on random-encoder features is thus never silently served EXAONEPath features, or the reverse.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..errors import ChatEXAONEPathError

logger = logging.getLogger(__name__)

# What must agree between the training features and the features a model is served.
# `precision` is the encoder's (fp32, bf16, fp16): bf16 features differ from fp32 ones by about 1 % per value, enough
# to move a small tower's answers, so a model is served features of the precision it learned from.
PROVENANCE_KEYS = ("encoder", "encoder_weights_sha256", "stain_norm", "stain_target_sha256", "patch_size", "target_mpp",
                   "precision")
# Recorded for messages and defaults, never compared (the target's hash is what counts).
INFO_KEYS = ("encoder_weights", "stain_target")
ALLOW_HINT = "pass --allow-feature-mismatch to use them anyway"


class FeatureMismatchError(ChatEXAONEPathError):
    """Features were made differently from those the model was trained on."""


def _normalised(key: str, value: object) -> object:
    if value is None:
        return None
    if key == "patch_size":
        return int(value)
    if key == "target_mpp":
        return round(float(value), 6)
    return str(value)


def provenance_of(attrs: dict) -> dict:
    """The provenance of one features file from its attributes; None for what it does not record.

    Files without attributes (`.pt` bags, other tools' `.h5`) have an all-None provenance.
    """
    found = {key: _normalised(key, attrs.get(key)) for key in (*PROVENANCE_KEYS, *INFO_KEYS)}
    if found["stain_norm"] is not None and found["stain_target_sha256"] is None:
        found["stain_target_sha256"] = "none"  # written before targets existed: the default reference or none
    return found


def file_provenance(path: str | Path) -> dict:
    """The provenance of a features file: its attributes (`.h5`), `encoder=external: slidechat-csv` for SlideChat's
    `.csv` files (which record nothing else), all None for `.pt` files (which carry no attributes)."""
    from ..vision_tower.features import SLIDECHAT_ATTRS, read_attrs

    path = Path(path)
    if path.suffix.lower() == ".csv":
        return provenance_of(SLIDECHAT_ATTRS)
    return provenance_of(read_attrs(path) if path.suffix in (".h5", ".hdf5") else {})


def is_known(provenance: dict | None) -> bool:
    """True when a provenance records anything to check against."""
    return bool(provenance) and any(provenance.get(key) is not None for key in PROVENANCE_KEYS)


def differing_keys(expected: dict, actual: dict) -> list[str]:
    """The provenance keys `expected` records whose value `actual` does not have."""
    return [key for key in PROVENANCE_KEYS
            if expected.get(key) is not None and _normalised(key, actual.get(key)) != expected[key]]


def describe(provenance: dict, keys: list[str]) -> str:
    """`encoder=exaonepath, stain_norm=none` for the given keys (hashes shortened)."""
    parts = []
    for key in keys:
        value = provenance.get(key)
        if value is None:
            value = "unrecorded"
        elif key.endswith("sha256") and value != "none":
            value = f"{str(value)[:12]}…"
        parts.append(f"{key}={value}")
    return ", ".join(parts)


def check_features(expected: dict | None, actual: dict, what: str, *, allow: bool = False) -> str | None:
    """None when `actual` matches the checkpoint's `expected` provenance; else raise, or (with `allow`) warn.

    `what` names the other side with its verb ("tumor.h5 has", "this extraction uses"). The message is one
    sentence naming both sides; with `allow` it is logged and returned, for the caller to show (the app
    puts it in its banner).
    """
    if not is_known(expected):
        return None
    differing = differing_keys(expected, actual)
    if not differing:
        return None
    sides = f"trained on features with {describe(expected, differing)}, but {what} {describe(actual, differing)}"
    if not allow:
        raise FeatureMismatchError(f"This checkpoint was {sides}; extract features with the checkpoint's settings "
                                   f"(the default of chat, app and eval run), or {ALLOW_HINT}.")
    # Lower case, no full stop: the app's banner lists it among its other warnings.
    warning = f"features unlike the model's training features are in use (--allow-feature-mismatch): it was {sides}"
    logger.warning(warning)
    return warning


def warn_if_unrecorded(provenance: dict | None, checkpoint: str | Path | None) -> None:
    """Log once that a trained checkpoint cannot be checked because it records no feature provenance."""
    if checkpoint is not None and not is_known(provenance):
        logger.warning("%s records no feature_provenance (trained before it was recorded, or on features without "
                       "attributes): the features it is served cannot be checked against its training features.",
                       checkpoint)


def extractor_provenance(extractor) -> dict:
    """The provenance of the features a `FeatureExtractor` makes (before it makes any)."""
    config, encoder = extractor.config, extractor.encoder
    return provenance_of({"encoder": encoder.name, "encoder_weights_sha256": encoder.weights_sha256,
                          "encoder_weights": encoder.weights_source, "stain_norm": config.stain_norm,
                          "stain_target_sha256": extractor.stain_target_sha256,
                          "stain_target": config.stain_target or "none", "patch_size": config.patch_size,
                          "target_mpp": config.target_mpp, "precision": extractor.precision})


def _recorded_stain_target(provenance: dict, allow: bool) -> str | None:
    """The Macenko target the checkpoint's features were fitted to, when that file is still where it was."""
    from ..vision_tower.stain import stain_target_sha256

    wanted, recorded = provenance.get("stain_target_sha256"), provenance.get("stain_target")
    if wanted in (None, "none"):
        return None
    if recorded not in (None, "none") and Path(recorded).is_file() and stain_target_sha256(recorded) == wanted:
        return recorded
    if allow:
        return None
    raise FeatureMismatchError(f"This checkpoint was trained on features Macenko-normalised to a target image "
                               f"({Path(str(recorded)).name}, sha256 {wanted[:12]}…) that is not at its recorded "
                               f"path; pass it with --stain-target IMAGE, or {ALLOW_HINT}.")


def serving_extractor(model_config, *, encoder: str | None = None, encoder_weights: str | None = None,
                      stain_norm: str | None = None, stain_target: str | None = None,
                      allow_feature_mismatch: bool = False, **extract_settings):
    """The `FeatureExtractor` chat and the app use for a model, and the mismatch warning (None when it matches).

    Unset options default to the checkpoint's `feature_provenance` (encoder, stain normalisation and target,
    patch size, µm/px); without one, to EXAONEPath when its weights are found, else a random ViT (warned).
    Options that make features unlike the training ones raise `FeatureMismatchError`, or with
    `allow_feature_mismatch` return the warning. `extract_settings` go to `ExtractConfig` (device, mpp…).
    """
    from ..vision_tower.encoder import EncoderError, available_encoders, build_encoder, build_encoder_or_random
    from ..vision_tower.extraction import ExtractConfig, FeatureExtractor

    provenance = getattr(model_config, "feature_provenance", None) or {}
    from_checkpoint = encoder is None and provenance.get("encoder") in available_encoders()
    if from_checkpoint:
        encoder = provenance["encoder"]
    stain_norm = stain_norm or provenance.get("stain_norm") or "none"
    if stain_target is None and stain_norm == "macenko":
        stain_target = _recorded_stain_target(provenance, allow_feature_mismatch)
    for key in ("patch_size", "target_mpp", "precision"):
        if provenance.get(key) is not None:
            extract_settings.setdefault(key, provenance[key])
    try:
        patch_encoder = build_encoder(encoder, encoder_weights) if encoder else \
            build_encoder_or_random(None, encoder_weights)
    except EncoderError as e:
        if not from_checkpoint:
            raise
        if not allow_feature_mismatch:
            raise EncoderError(f"This checkpoint was trained on {encoder} features, but that encoder cannot be "
                               f"loaded here ({str(e).rstrip('.')}); {ALLOW_HINT} with another encoder.") from e
        patch_encoder = build_encoder_or_random(None, encoder_weights)
    config = ExtractConfig(encoder=patch_encoder.name, encoder_weights=encoder_weights, stain_norm=stain_norm,
                           stain_target=stain_target, **extract_settings)
    extractor = FeatureExtractor(config, patch_encoder)
    warning = check_features(provenance, extractor_provenance(extractor), "this extraction uses",
                             allow=allow_feature_mismatch)
    return extractor, warning
