"""The explicit safety signal (Li & Kim, "Safety Alignment Can Be Not Superficial With Explicit
Safety Signals", ICML 2025): a ``[CLS]`` classifier trained into the model (``signal``) and
its training objective ``L_lm + lambda * L_cls`` (``objective``), and generation that keeps
re-deciding whether to refuse (``decoding``: strategic attention and decoding)."""

from ssah_jax.signals.decoding import (
    REFUSAL_PREFIX,
    SCHEDULES,
    Rules,
    SignalModel,
    SignalState,
    StrategicDecoding,
    decode_inputs,
    generate,
)
from ssah_jax.signals.linear_probe import ProbeResult, fit_probe
from ssah_jax.signals.objective import SignalLoss
from ssah_jax.signals.quality import auroc, separation
from ssah_jax.signals.signal import (
    FILE,
    HEADS,
    PHASES,
    Rechecks,
    SafetySignal,
    classify,
    cls_states,
    forward,
    forward_views,
    head_logit,
    load,
    mask,
    prepend_cls,
    save,
    sees_query,
    views,
)

__all__ = [
    "auroc", "separation", "FILE", "HEADS", "PHASES", "REFUSAL_PREFIX", "SCHEDULES", "ProbeResult", "Rechecks",
    "Rules", "SafetySignal", "SignalLoss", "SignalModel", "SignalState", "StrategicDecoding", "classify",
    "cls_states", "decode_inputs", "fit_probe", "forward", "forward_views", "generate", "head_logit", "load", "mask",
    "prepend_cls", "save", "sees_query", "views",
]
