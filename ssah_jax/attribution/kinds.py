"""The four kinds of unit (SSAH: Li & Kim, arXiv 2410.10862) and the UnitMap that records them.

With ``I_S`` the safety score and ``I_U`` the utility score of a unit, both normalised:

    SCU  safety critical    the highest I_S - I_U   (fraction r_SCU of the units)
    UCU  utility critical   the lowest  I_S - I_U   (fraction r_UCU)
    RU   redundant          the lowest  I_S + I_U   (fraction r_RU)
    CU   complex            every other unit

The kinds are taken in that order (SCU, then UCU among the rest, then RU among the rest), so
they are disjoint, cover every unit, and each holds exactly ``round(fraction * n)`` units, ``n``
being the units of the model (``ranking="global"``) or of each layer's attention / MLP block
(``ranking="per_layer"``). Ties break by unit order.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ssah_jax import hosts
from ssah_jax.models import MODULES, CausalLM

KINDS = ("SCU", "UCU", "CU", "RU")
RANKINGS = ("global", "per_layer")
NORMALISATIONS = ("layer_mean", "none")
FORMAT_VERSION = 1


class UnitMapMismatch(ValueError):
    """A unit map was computed for another model."""


def _normalise(scores: Mapping[str, Any], how: str) -> dict[str, np.ndarray]:
    out = {}
    for m in MODULES:
        s = np.asarray(scores[m], np.float64)
        if how == "layer_mean":  # each layer's attention (MLP) block divided by its mean score
            mean = s.mean(axis=1, keepdims=True)
            s = s / np.where(mean > 0, mean, 1.0)
        out[m] = s
    return out


def _flat(d: Mapping[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([np.asarray(d[m]).reshape(-1) for m in MODULES])


def _unflat(flat: np.ndarray, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    out, start = {}, 0
    for m in MODULES:
        n = int(np.prod(shapes[m]))
        out[m] = flat[start : start + n].reshape(shapes[m])
        start += n
    return out


def _assign(diff: np.ndarray, total: np.ndarray, counts: Mapping[str, int]) -> np.ndarray:
    """Kind index per unit (positions in KINDS) for one group of units."""
    kind = np.full(diff.shape, KINDS.index("CU"), np.int8)
    free = np.ones(diff.shape, bool)
    order = np.arange(diff.size)
    for name, key in (("SCU", -diff), ("UCU", diff), ("RU", total)):
        ranked = np.lexsort((order, key))  # ascending key, ties by unit order
        chosen = ranked[free[ranked]][: counts[name]]
        kind[chosen] = KINDS.index(name)
        free[chosen] = False
    return kind


def model_identity(model: CausalLM) -> dict[str, Any]:
    """The model's config and a fingerprint of its weights: sha256 of a strided sample (at most
    64 values per axis) of every parameter, rounded to bfloat16 so the same checkpoint loaded in
    float32 or bfloat16 matches."""
    digest = hashlib.sha256()
    state = nnx.state(model, nnx.Param)
    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    for path, leaf in sorted(leaves, key=lambda kv: jax.tree_util.keystr(kv[0])):
        index = tuple(slice(None, None, max(1, n // 64)) for n in leaf.shape)
        sample = np.asarray(jnp.asarray(leaf[index]).astype(jnp.bfloat16)).view(np.uint16)
        digest.update(jax.tree_util.keystr(path).encode())
        digest.update(str(leaf.shape).encode())
        digest.update(sample.tobytes())
    config = json.loads(json.dumps(dataclasses.asdict(model.config), default=list))
    return {"config": config, "fingerprint": digest.hexdigest()[:16]}


@dataclasses.dataclass(frozen=True)
class UnitMap:
    """Unit kinds of one model. ``masks[kind][module]`` is bool ``[layers, units]``;
    ``scores`` holds the safety and utility scores it was built from; ``info`` records how
    (fractions, ranking, normalisation, and what the caller adds: scorer, data, ...);
    ``model`` is :func:`model_identity` of the model it belongs to."""

    masks: dict[str, dict[str, np.ndarray]]
    scores: dict[str, dict[str, np.ndarray]]
    info: dict[str, Any]
    model: dict[str, Any] | None = None

    def mask(self, *kinds: str) -> dict[str, np.ndarray]:
        """Unit mask of the union of ``kinds`` (e.g. ``umap.mask("SCU", "CU")``)."""
        unknown = set(kinds) - set(KINDS)
        if unknown or not kinds:
            raise ValueError(f"kinds {sorted(unknown) or '()'}: choose from {KINDS}")
        return {m: np.logical_or.reduce([self.masks[k][m] for k in kinds]) for m in MODULES}

    def select(self, spec: str) -> dict[str, np.ndarray]:
        """Unit mask of a selection: kinds joined by ``+``; ``KIND:f`` takes only the top ``f``
        (a fraction of *all* units) of that kind, ranked like SCU (highest normalised
        ``I_S - I_U``, ties by unit order). Examples: ``"SCU+CU:0.06"`` (SCU and the 6% most
        safety-leaning units among the CU, the paper's freeze setting), ``"SCU+CU"``, ``"RU"``."""
        shapes = {m: self.masks["CU"][m].shape for m in MODULES}
        selected = np.zeros(self.num_units, bool)
        for term in spec.replace(" ", "").split("+"):
            kind, _, fraction = term.partition(":")
            if kind not in KINDS:
                raise ValueError(f"unit selection {spec!r}: {kind!r} is not a kind {KINDS}")
            members = _flat(self.masks[kind])
            if not fraction:
                selected |= members
                continue
            try:
                f = float(fraction)
            except ValueError:
                raise ValueError(f"unit selection {spec!r}: {fraction!r} is not a fraction") from None
            count = int(round(f * self.num_units))
            if not 0 <= f <= 1 or count > members.sum():
                raise ValueError(f"unit selection {spec!r}: {term} asks for {count} units, {kind} has "
                                 f"{int(members.sum())}")
            how = self.info.get("normalise", "none")
            s, u = _normalise(self.scores["safety"], how), _normalise(self.scores["utility"], how)
            diff = _flat({m: s[m] - u[m] for m in MODULES})
            ranked = np.lexsort((np.arange(diff.size), -diff))
            selected[ranked[members[ranked]][:count]] = True
        return _unflat(selected, shapes)

    def random_units(self, count: int, seed: int) -> dict[str, np.ndarray]:
        """A unit mask of ``count`` units drawn uniformly from all units (a control)."""
        shapes = {m: self.masks["CU"][m].shape for m in MODULES}
        flat = np.zeros(self.num_units, bool)
        flat[np.random.default_rng(seed).choice(flat.size, size=count, replace=False)] = True
        return _unflat(flat, shapes)

    def counts(self) -> dict[str, int]:
        return {k: int(sum(self.masks[k][m].sum() for m in MODULES)) for k in KINDS}

    @property
    def num_units(self) -> int:
        return int(sum(self.masks["CU"][m].size for m in MODULES))

    def per_layer(self) -> dict[str, dict[str, list[int]]]:
        """``{module: {kind: [count per layer]}}``."""
        return {m: {k: self.masks[k][m].sum(axis=1).astype(int).tolist() for k in KINDS} for m in MODULES}

    def summary(self) -> dict[str, Any]:
        counts = self.counts()
        return {
            "format_version": FORMAT_VERSION,
            "model": self.model,
            **self.info,
            "units": self.num_units,
            "counts": counts,
            "shares": {k: counts[k] / self.num_units for k in KINDS},
            "per_layer": self.per_layer(),
        }

    def save(self, path: str | Path) -> tuple[Path, Path]:
        """Writes ``<path>.npz`` (masks and scores) and ``<path>.json`` (the summary)."""
        path = Path(path)
        arrays = {f"mask/{k}/{m}": self.masks[k][m] for k in KINDS for m in MODULES}
        arrays |= {f"score/{s}/{m}": self.scores[s][m] for s in self.scores for m in MODULES}
        npz, summary = path.with_suffix(".npz"), path.with_suffix(".json")
        if hosts.is_main():  # in a multi-host run every process holds the same map
            np.savez_compressed(npz, **arrays)
            summary.write_text(json.dumps(self.summary(), indent=2) + "\n")
        return npz, summary

    @classmethod
    def load(cls, path: str | Path, model: CausalLM | None = None) -> UnitMap:
        """Reads a saved map; with ``model``, raises :class:`UnitMapMismatch` unless the map
        was computed for that model (same config and weight fingerprint)."""
        path = Path(path)
        npz, summary_path = path.with_suffix(".npz"), path.with_suffix(".json")
        for p in (npz, summary_path):
            if not p.exists():
                raise FileNotFoundError(f"{p}: no such unit map file (a map is a .npz and a .json)")
        summary = json.loads(summary_path.read_text())
        if summary.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{summary_path}: format_version {summary.get('format_version')!r}, "
                             f"this version reads {FORMAT_VERSION}")
        with np.load(npz) as data:
            masks = {k: {m: data[f"mask/{k}/{m}"] for m in MODULES} for k in KINDS}
            names = sorted({key.split("/")[1] for key in data.files if key.startswith("score/")})
            scores = {s: {m: data[f"score/{s}/{m}"] for m in MODULES} for s in names}
        derived = ("format_version", "model", "units", "counts", "shares", "per_layer")
        umap = cls(masks, scores, {k: v for k, v in summary.items() if k not in derived}, summary["model"])
        if model is not None:
            umap.check(model, where=str(summary_path))
        return umap

    def check(self, model: CausalLM, where: str = "unit map") -> None:
        """Raises :class:`UnitMapMismatch` unless this map belongs to ``model``."""
        if self.model is None:
            raise UnitMapMismatch(f"{where}: records no model identity; cannot check it belongs to this model")
        here = model_identity(model)
        if here["config"] != self.model["config"]:
            diff = sorted(k for k in here["config"] if here["config"][k] != self.model["config"].get(k))
            raise UnitMapMismatch(f"{where}: computed for a model with another config (differs in {diff})")
        if here["fingerprint"] != self.model["fingerprint"]:
            raise UnitMapMismatch(
                f"{where}: computed for other weights (fingerprint {self.model['fingerprint']}, "
                f"this model {here['fingerprint']})"
            )


def classify(
    safety_scores: Mapping[str, Any],
    utility_scores: Mapping[str, Any],
    fractions: Mapping[str, float],
    *,
    ranking: str = "global",
    normalise: str = "layer_mean",
    model: CausalLM | None = None,
    info: Mapping[str, Any] | None = None,
) -> UnitMap:
    """Splits units into SCU / UCU / CU / RU (see the module docstring).

    Args:
      safety_scores, utility_scores: ``{"attn": [L, n_attn], "mlp": [L, n_mlp]}`` (from
        :func:`ssah_jax.attribution.unit_scores`).
      fractions: ``{"SCU": r, "UCU": r, "RU": r}``, each in [0, 1], summing to at most 1.
      ranking: ``global`` (one ranking over all units) or ``per_layer`` (each layer's attention
        and MLP units separately, each with the same fractions).
      normalise: ``layer_mean`` (divide each layer's attention / MLP scores by their mean, so
        blocks of different scale compare) or ``none``.
      model: records its identity in the map (loading checks it).
      info: anything else to record (scorer, data, ...).
    """
    if ranking not in RANKINGS:
        raise ValueError(f"ranking={ranking!r}: must be one of {RANKINGS}")
    if normalise not in NORMALISATIONS:
        raise ValueError(f"normalise={normalise!r}: must be one of {NORMALISATIONS}")
    wanted = {"SCU", "UCU", "RU"}
    if set(fractions) != wanted:
        raise ValueError(f"fractions has keys {sorted(fractions)}, needs exactly {sorted(wanted)}")
    bad = {k: v for k, v in fractions.items() if not 0 <= v <= 1}
    if bad or sum(fractions.values()) > 1:
        raise ValueError(f"fractions {dict(fractions)}: each must be in [0, 1] and their sum at most 1")
    raw = {"safety": {m: np.asarray(safety_scores[m], np.float32) for m in MODULES},
           "utility": {m: np.asarray(utility_scores[m], np.float32) for m in MODULES}}
    shapes = {m: raw["safety"][m].shape for m in MODULES}
    if {m: raw["utility"][m].shape for m in MODULES} != shapes:
        raise ValueError("safety and utility scores have different shapes")
    s, u = _normalise(raw["safety"], normalise), _normalise(raw["utility"], normalise)
    diff = {m: s[m] - u[m] for m in MODULES}
    total = {m: s[m] + u[m] for m in MODULES}

    def counts(n: int) -> dict[str, int]:
        return {k: int(round(fractions[k] * n)) for k in wanted}

    if ranking == "global":
        flat_diff = _flat(diff)
        kind = _unflat(_assign(flat_diff, _flat(total), counts(flat_diff.size)), shapes)
    else:
        kind = {m: np.stack([_assign(diff[m][i], total[m][i], counts(diff[m].shape[1]))
                             for i in range(shapes[m][0])]) for m in MODULES}
    masks = {k: {m: kind[m] == KINDS.index(k) for m in MODULES} for k in KINDS}
    record = {"fractions": dict(fractions), "ranking": ranking, "normalise": normalise, **(info or {})}
    return UnitMap(masks, raw, record, None if model is None else model_identity(model))


def sweep_fraction(
    degradation: Callable[[float], float], fractions: Sequence[float], tolerance: float
) -> tuple[float, list[tuple[float, float]]]:
    """The paper's rule for choosing a kind's fraction: try ``fractions`` in increasing order,
    ``degradation(f)`` measuring how much the attribute the kind should *not* touch got worse
    (e.g. utility points lost when pruning SCU at fraction ``f``); keep the largest fraction
    before the first one that degrades by more than ``tolerance``.

    Returns ``(chosen fraction, [(fraction, degradation), ...] tried)``; the chosen fraction is
    0.0 when even the smallest one exceeds the tolerance.
    """
    chosen, tried = 0.0, []
    for f in sorted(fractions):
        d = float(degradation(f))
        tried.append((f, d))
        if d > tolerance:
            break
        chosen = f
    return chosen, tried


def transition_matrix(before: UnitMap, after: UnitMap) -> np.ndarray:
    """int64 ``[4, 4]``: entry ``[i, j]`` counts the units of kind ``KINDS[i]`` in ``before``
    that are of kind ``KINDS[j]`` in ``after`` (attribute transfer, SSAH Figs 5-6)."""
    if {m: before.masks["CU"][m].shape for m in MODULES} != {m: after.masks["CU"][m].shape for m in MODULES}:
        raise UnitMapMismatch("the two unit maps cover different units")
    return np.asarray([[int(sum((before.masks[a][m] & after.masks[b][m]).sum() for m in MODULES))
                        for b in KINDS] for a in KINDS], np.int64)


def kind_transitions(scores: Sequence[tuple[Mapping[str, Any], Mapping[str, Any]]], fractions: Mapping[str, float],
                     **classify_options: Any) -> list[np.ndarray]:
    """Attribute transfer (SSAH Figs 5-6) along a sequence of models (e.g. unaligned, aligned,
    attacked): each model's ``(safety, utility)`` unit scores classified with the same
    ``fractions`` (and ``classify_options``: ranking, normalise), then the
    :func:`transition_matrix` of each consecutive pair."""
    maps = [classify(safety, utility, fractions, **classify_options) for safety, utility in scores]
    return [transition_matrix(before, after) for before, after in zip(maps, maps[1:])]

