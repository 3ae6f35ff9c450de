"""Architectures beyond the fixed matrix: every text model type transformers' auto mappings name,
built as a tiny model where its config allows, through the matrix stages (issue 25).

The fixed list (``ENCODERS``/``DECODERS``) runs in CI; this runs on demand
(``scripts/architecture_matrix.py --discover``), because transformers ships about 200 such
types and a run of all of them takes longer than CI allows. Candidates:
- encoders: the model types of ``MODEL_FOR_MASKED_LM_MAPPING_NAMES`` (not encoder-decoders),
  loaded with ``AutoModel`` (the bare encoder, as sentence-embedding users load it), also where
  transformers gives them a causal-LM head too (RoBERTa-like types);
- decoders: the other types of ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``, loaded with
  ``AutoModelForCausalLM`` (for an encoder-decoder such as BART: its decoder).

A type is not built (and the record says why) when its config is composite (a vision or audio
tower beside the text model: ``TINY_SIZES`` do not reach the sub-configs, and its inputs are
not token ids alone), or when the tiny sizes leave it large (its config names its sizes
otherwise), measured on the meta device without allocating.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from .architectures import DECODERS, ENCODERS, build_architecture, loader_of, tiny_config
from .matrix import STAGES, MatrixRow, StageOutcome, run_architecture

DISCOVERY_STAGES = tuple(s for s in STAGES if s != "lower-inductor")
"""The matrix stages a discovered type runs (compiling for inductor takes 10-45 s a type)."""
MAX_TINY_PARAMETERS = 5_000_000
"""A listed architecture at the tiny sizes has 0.05-0.2 M parameters, a mixture of experts with
four experts up to 4 M; a type far above that did not take the sizes (it names them otherwise)
and would take minutes a stage on one core."""


@dataclasses.dataclass(frozen=True)
class Candidate:
    model_type: str
    loader: str  # "AutoModel" or "AutoModelForCausalLM"


@dataclasses.dataclass(frozen=True)
class DiscoveredRow:
    model_type: str
    loader: str
    not_built: str = ""  # why no tiny model was built ("" when one was)
    outcomes: tuple[StageOutcome, ...] = ()

    @property
    def passed(self) -> bool:
        return not self.not_built and bool(self.outcomes) and all(o.passed for o in self.outcomes)  # a failure ends a row

    def as_dict(self) -> dict:
        return {"architecture": self.model_type, "loader": self.loader, "not_built": self.not_built,
                "outcomes": [dataclasses.asdict(o) for o in self.outcomes]}


def candidates(include_listed: bool = False) -> tuple[Candidate, ...]:
    """Every text encoder and causal-LM model type of the installed transformers, sorted (the
    fixed matrix's own types left out unless ``include_listed``)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES

    listed = set() if include_listed else set(ENCODERS + DECODERS)
    types = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES) | set(MODEL_FOR_MASKED_LM_MAPPING_NAMES)
    return tuple(Candidate(t, loader_of(t)) for t in sorted(types - listed))


def why_not_buildable(model_type: str) -> str:
    """Why ``model_type`` gets no tiny model here ("" when it can): a composite config, a config
    that rejects the tiny sizes, or one that stays large at them (built on the meta device)."""
    import torch
    from transformers import AutoModel, AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    config_class = CONFIG_MAPPING[model_type]
    if getattr(config_class, "sub_configs", None):
        names = ", ".join(sorted(config_class.sub_configs))
        return f"composite config ({names}): the tiny sizes do not reach its sub-configs"
    try:
        config = tiny_config(model_type)
        auto = AutoModelForCausalLM if loader_of(model_type) == "AutoModelForCausalLM" else AutoModel
        with torch.device("meta"):
            model = auto.from_config(config)
    except Exception as exc:  # noqa: BLE001 - any failure to build is recorded, not raised
        return f"no tiny model: {_first_line(exc)}"
    parameters = sum(p.numel() for p in model.parameters())
    if parameters > MAX_TINY_PARAMETERS:
        return f"{parameters / 1e6:.1f} M parameters at the tiny sizes (its config names its sizes otherwise)"
    return ""


def run_discovered(candidate: Candidate, stages: Sequence[str] = DISCOVERY_STAGES) -> DiscoveredRow:
    """``candidate`` through ``stages``, or the reason it was not built; a model that cannot run
    its own forward pass on the tiny inputs is recorded as not built (the failure is not ours)."""
    import torch

    why = why_not_buildable(candidate.model_type)
    if why:
        return DiscoveredRow(candidate.model_type, candidate.loader, why)
    try:
        g = build_architecture(candidate.model_type)
        with torch.no_grad():
            g.model(**g.inputs)
    except Exception as exc:  # noqa: BLE001 - the float model itself does not run on token ids
        return DiscoveredRow(candidate.model_type, candidate.loader, f"float model: {_first_line(exc)}")
    row: MatrixRow = run_architecture(candidate.model_type, stages)
    return DiscoveredRow(candidate.model_type, candidate.loader, "", row.outcomes)


def _first_line(exc: BaseException) -> str:
    line = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {line[:200]}"
