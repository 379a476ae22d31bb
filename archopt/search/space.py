"""Search spaces: declarative choices over archopt's operators, each candidate a registry model.

A space names a registered model family and lists, for some of its config fields, the values a
search may pick; everything else is fixed. A candidate is then ``create_model(model,
**overrides)`` run at one input ``resolution``: a valid model of the registry, trained, counted
and measured like any other. Three shapes of choice, all JSON:

- ``stages`` (image spaces over ``stagenet``): per stage the block type (``conv`` full conv,
  ``ds`` depthwise separable, ``ir`` inverted residual, ``mvit`` MobileViT block), the width
  multiplier of the stage's base ``channels``, kernel size, expansion, depth and, for MobileViT
  blocks, the transformer width ``dim``; a value is fixed, a list is a choice.
- ``fields``: plain config fields and their choices (``{"window": [2, 4, 8]}``).
- ``per_head``: a field with one value per attention head, each head chosen apart
  (``{"dilation": [1, 2, 4]}``, the Longformer paper's per-head dilation).

plus ``resolution`` (the input side: the resolution multiplier) and ``stem_channels``.
``archopt search --list-spaces`` prints the built-in spaces; ``--space path.json`` reads one
in the same form as ``SearchSpace.as_dict()``.

Every choice is one integer gene (an index into its list), which is what the search algorithm
sees; ``decode`` turns genes into a candidate and ``canonical`` zeroes the genes a candidate does
not use (the expansion of a depthwise separable stage), so that two genomes of one network are
one point of the space.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from archopt.models.mobilenet_v1 import make_divisible
from archopt.models.stagenet import BLOCK_TYPES

STAGE_KEYS = ("block", "channels", "width", "depth", "stride", "kernel_size", "expand_ratio", "dim")
STAGE_CHOICES = ("block", "width", "depth", "kernel_size", "expand_ratio", "dim")  # may be lists
SPACE_KEYS = (
    "name",
    "model",
    "description",
    "resolution",
    "fixed",
    "stem_channels",
    "stages",
    "head_ratio",
    "fields",
    "per_head",
    "recipe",
    "hand_designed",
)
RECIPE_KEYS = ("epochs", "batch_size", "optimizer", "lr", "warmup_epochs")


@dataclass(frozen=True)
class Candidate:
    """One point of a space: a registered model with overrides, at one input resolution."""

    model: str
    overrides: dict
    resolution: int
    label: str = ""

    @property
    def key(self) -> str:
        """Identity of the network: equal keys, equal models (the label does not count)."""
        return json.dumps(
            {"model": self.model, "overrides": self.overrides, "resolution": self.resolution},
            sort_keys=True,
        )

    def build(self, num_classes: int, in_chans: int):
        from archopt.registry import create_model

        overrides = {"num_classes": num_classes, "in_chans": in_chans, **self.overrides}
        if self.model == "pixel_longformer":
            overrides.setdefault("img_size", self.resolution)
        return create_model(self.model, **overrides)

    def as_dict(self) -> dict:
        return {
            "label": self.label,
            "model": self.model,
            "overrides": self.overrides,
            "resolution": self.resolution,
        }


@dataclass(frozen=True)
class Gene:
    name: str  # "resolution", "stage3.block", "window", "dilation.h1"
    choices: tuple


def _err(space: str, msg: str) -> ValueError:
    return ValueError(f"search space {space!r}: {msg}")


def _choices(space: str, where: str, value) -> tuple:
    """A fixed value as a 1-tuple, a list as its choices; empty or repeated lists are errors."""
    if isinstance(value, (list, tuple)):
        if not value:
            raise _err(space, f"{where} lists no choices: expected at least one value, got []")
        if len(set(map(json.dumps, value))) != len(value):
            raise _err(space, f"{where} repeats a choice: expected distinct values, got {value}")
        return tuple(value)
    return (value,)


def _positive_ints(space: str, where: str, values: tuple, minimum: int = 1) -> None:
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            raise _err(space, f"{where} must be ints >= {minimum}, got {v!r}")


@dataclass(frozen=True)
class SearchSpace:
    name: str
    model: str
    resolution: tuple[int, ...]
    description: str = ""
    fixed: dict = field(default_factory=dict)
    stem_channels: int | tuple[int, ...] = 32
    stages: tuple[dict, ...] = ()
    head_ratio: float = 0.0  # > 0: a 1x1 conv to head_ratio x the last width before pooling
    fields: dict = field(default_factory=dict)
    per_head: dict = field(default_factory=dict)
    recipe: dict = field(default_factory=dict)  # default training recipe for this space
    hand_designed: tuple[dict, ...] = ()  # {"label", "model", "overrides", "resolution"}

    # ------------------------------------------------------------------ construction, checks

    @classmethod
    def from_dict(cls, data: Mapping) -> SearchSpace:
        """A space from its JSON form; unknown keys and contradictions are one-line errors."""
        if not isinstance(data, Mapping):
            raise ValueError(f"a search space must be a JSON object, got {type(data).__name__}")
        name = str(data.get("name", "custom"))
        unknown = sorted(set(data) - set(SPACE_KEYS))
        if unknown:
            raise _err(name, f"unknown key(s) {unknown}: expected any of {list(SPACE_KEYS)}")
        if not data.get("model"):
            raise _err(name, "needs a 'model' (a registered model name), got none")
        kwargs = dict(data)
        kwargs["name"] = name
        if "resolution" not in kwargs:
            raise _err(name, "needs 'resolution' (an input side or a list of them), got none")
        kwargs["resolution"] = _choices(name, "resolution", kwargs["resolution"])
        if isinstance(kwargs.get("stem_channels"), list):
            kwargs["stem_channels"] = tuple(kwargs["stem_channels"])
        kwargs["stages"] = tuple(dict(s) for s in kwargs.get("stages", ()) or ())
        kwargs["hand_designed"] = tuple(dict(h) for h in kwargs.get("hand_designed", ()) or ())
        for key in ("fixed", "fields", "per_head", "recipe"):
            if not isinstance(kwargs.get(key, {}), Mapping):
                raise _err(name, f"{key} must be a JSON object, got {kwargs[key]!r}")
        space = cls(**kwargs)
        space.validate()
        return space

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return json.loads(json.dumps(d))

    def validate(self) -> None:
        """Raise a one-line ValueError for an empty or contradictory space."""
        from archopt.registry import model_info

        n = self.name
        if not self.name or not isinstance(self.name, str):
            raise ValueError(f"a search space needs a name, got {self.name!r}")
        try:
            info = model_info(self.model)
        except ValueError as e:
            raise _err(n, str(e)) from None
        if info.task != "image":
            raise _err(n, f"model must be an image classifier, got {self.model!r} ({info.task})")
        _positive_ints(n, "resolution", self.resolution)
        unknown = sorted(set(self.recipe) - set(RECIPE_KEYS))
        if unknown:
            raise _err(n, f"unknown recipe key(s) {unknown}: expected any of {list(RECIPE_KEYS)}")
        if self.stages and self.model != "stagenet":
            raise _err(n, f"'stages' needs model 'stagenet', got {self.model!r}")
        if self.model == "stagenet" and not self.stages:
            raise _err(n, "a stagenet space needs 'stages', got none")
        searched = set(self.fields) | set(self.per_head)
        both = sorted(searched & set(self.fixed))
        if both:
            raise _err(n, f"{both} are both fixed and searched: expected each in one place")
        if self.stages:
            reserved = sorted({"stages", "stem_channels", "num_features"} & set(self.fixed))
            if reserved:
                raise _err(n, f"{reserved} come from 'stages' and must not be in 'fixed'")
            self._validate_stages()
        for key, values in self.fields.items():
            _choices(n, f"field {key!r}", values)
        if self.per_head:
            heads = self.fixed.get("num_heads")
            if not isinstance(heads, int) or heads < 1:
                raise _err(
                    n, f"per_head fields need 'num_heads' fixed to an int >= 1, got {heads!r}"
                )
            for key, values in self.per_head.items():
                _choices(n, f"per_head field {key!r}", values)
        if not self.genes():
            raise _err(
                n,
                "is empty: every field is fixed, so it holds one candidate; expected at least "
                "one list of two or more choices",
            )
        if self.model == "pixel_longformer":
            self._validate_attention()
        # Build the first and the last candidate on the meta device: a field the model does not
        # have, or a value it refuses, fails here with the model's own message.
        import torch

        last = [len(g.choices) - 1 for g in self.genes()]
        for genes in ([0] * len(last), last):
            cand = self.decode(genes)
            try:
                with torch.device("meta"):
                    cand.build(num_classes=10, in_chans=3)
            except (ValueError, TypeError) as e:
                raise _err(
                    n, f"candidate {cand.overrides} is not a valid {self.model}: {e}"
                ) from None
        for h in self.hand_designed:
            missing = sorted({"label", "model", "resolution"} - set(h))
            if missing:
                raise _err(n, f"hand_designed entry {h} lacks {missing}")

    def _validate_stages(self) -> None:
        n = self.name
        _positive_ints(n, "stem_channels", _choices(n, "stem_channels", self.stem_channels))
        stride = 2
        for i, s in enumerate(self.stages, 1):
            where = f"stage {i}"
            unknown = sorted(set(s) - set(STAGE_KEYS))
            if unknown:
                raise _err(n, f"{where} has unknown key(s) {unknown}: expected {list(STAGE_KEYS)}")
            for key in ("block", "channels"):
                if key not in s:
                    raise _err(n, f"{where} needs {key!r}, got {sorted(s)}")
            for key in ("channels", "stride"):
                if isinstance(s.get(key), list):
                    raise _err(n, f"{where} {key} must be one value (search 'width' instead)")
            blocks = _choices(n, f"{where} block", s["block"])
            bad = [b for b in blocks if b not in BLOCK_TYPES]
            if bad:
                raise _err(n, f"{where} block must be from {BLOCK_TYPES}, got {bad[0]!r}")
            _positive_ints(n, f"{where} channels", (s["channels"],))
            _positive_ints(n, f"{where} depth", _choices(n, f"{where} depth", s.get("depth", 1)))
            kernels = _choices(n, f"{where} kernel_size", s.get("kernel_size", 3))
            _positive_ints(n, f"{where} kernel_size", kernels)
            if any(k % 2 == 0 for k in kernels):
                raise _err(n, f"{where} kernel_size must be odd, got {list(kernels)}")
            for key in ("width", "expand_ratio"):
                for v in _choices(n, f"{where} {key}", s.get(key, 1.0)):
                    if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                        raise _err(n, f"{where} {key} must be numbers > 0, got {v!r}")
            if s.get("stride", 1) not in (1, 2):
                raise _err(n, f"{where} stride must be 1 or 2, got {s.get('stride')!r}")
            stride *= s.get("stride", 1)
            if "mvit" in blocks:
                dims = _choices(n, f"{where} dim", s.get("dim", 0))
                _positive_ints(n, f"{where} dim (needed by its mvit block)", dims)
                heads = self.fixed.get("num_heads", 4)
                if any(d % heads for d in dims):
                    raise _err(n, f"{where} dim must be multiples of num_heads={heads}, got {dims}")
        small = [r for r in self.resolution if r < stride]
        if small:
            raise _err(
                n, f"resolution must be >= the network's total stride {stride}, got {small[0]}"
            )

    def _validate_attention(self) -> None:
        n = self.name
        for key in ("window", "num_layers", "hidden_size"):
            if key in self.fields:
                _positive_ints(n, f"field {key!r}", _choices(n, key, self.fields[key]))
        if "num_global" in self.fields:
            _positive_ints(n, "field 'num_global'", _choices(n, "g", self.fields["num_global"]), 0)
        if "dilation" in self.per_head:
            _positive_ints(n, "per_head 'dilation'", _choices(n, "d", self.per_head["dilation"]))
        heads = self.fixed.get("num_heads", 4)
        hidden = _choices(n, "hidden_size", self.fields.get("hidden_size", 64))
        bad = [h for h in hidden if h % heads]
        if bad:
            raise _err(n, f"hidden_size must be multiples of num_heads={heads}, got {bad[0]}")

    # -------------------------------------------------------------------------- the genes

    def genes(self) -> list[Gene]:
        """Every choice with two or more values, in a fixed order; fixed values are no genes."""
        n = self.name
        out = [Gene("resolution", tuple(self.resolution))]
        if self.stages:
            out.append(Gene("stem_channels", _choices(n, "stem", self.stem_channels)))
            for i, s in enumerate(self.stages, 1):
                for key in STAGE_CHOICES:
                    default = {"width": 1.0, "depth": 1, "kernel_size": 3}.get(key)
                    default = {"expand_ratio": 4.0, "dim": 0}.get(key, default)
                    out.append(Gene(f"stage{i}.{key}", _choices(n, key, s.get(key, default))))
        for key, values in self.fields.items():
            out.append(Gene(key, _choices(n, key, values)))
        for key, values in self.per_head.items():
            for h in range(self.fixed["num_heads"]):
                out.append(Gene(f"{key}.h{h}", _choices(n, key, values)))
        return [g for g in out if len(g.choices) > 1]

    @property
    def size(self) -> int:
        """Number of genomes (networks can repeat: see ``canonical``)."""
        return math.prod(len(g.choices) for g in self.genes())

    def decode(self, genes: Sequence[int], label: str = "") -> Candidate:
        """The candidate an integer genome (one index per gene) stands for."""
        gs = self.genes()
        if len(genes) != len(gs):
            raise ValueError(f"expected {len(gs)} genes for space {self.name!r}, got {len(genes)}")
        pick = {g.name: g.choices[int(i)] for g, i in zip(gs, genes)}
        n = self.name

        def value(name: str, default):
            return pick[name] if name in pick else _choices(n, name, default)[0]

        overrides = dict(self.fixed)
        if self.stages:
            stages = []
            for i, s in enumerate(self.stages, 1):
                block = value(f"stage{i}.block", s["block"])
                width = value(f"stage{i}.width", s.get("width", 1.0))
                stage = {
                    "block": block,
                    "channels": make_divisible(s["channels"] * width),
                    "depth": value(f"stage{i}.depth", s.get("depth", 1)),
                    "stride": s.get("stride", 1),
                    "kernel_size": value(f"stage{i}.kernel_size", s.get("kernel_size", 3)),
                }
                if block in ("ir", "mvit"):
                    stage["expand_ratio"] = value(
                        f"stage{i}.expand_ratio", s.get("expand_ratio", 4.0)
                    )
                if block == "mvit":
                    stage["dim"] = value(f"stage{i}.dim", s.get("dim", 0))
                stages.append(stage)
            overrides["stages"] = stages
            overrides["stem_channels"] = value("stem_channels", self.stem_channels)
            if self.head_ratio:
                overrides["num_features"] = round(self.head_ratio * stages[-1]["channels"])
        for key, values in self.fields.items():
            overrides[key] = value(key, values)
        for key, values in self.per_head.items():
            per = [value(f"{key}.h{h}", values) for h in range(self.fixed["num_heads"])]
            overrides[key] = per
        return Candidate(self.model, overrides, int(value("resolution", self.resolution)), label)

    def canonical(self, genes: Sequence[int]) -> list[int]:
        """The genome with every gene the network does not use set to 0 (same network)."""
        genes = [int(g) for g in genes]
        key = self.decode(genes).key
        for i, g in enumerate(genes):
            if g:
                trial = [*genes[:i], 0, *genes[i + 1 :]]
                if self.decode(trial).key == key:
                    genes = trial
        return genes

    def sample(self, rng: np.random.Generator) -> list[int]:
        """A uniformly random genome (each gene uniform over its choices), canonical."""
        return self.canonical([int(rng.integers(len(g.choices))) for g in self.genes()])

    def hand_designed_candidates(self) -> list[Candidate]:
        return [
            Candidate(h["model"], dict(h.get("overrides", {})), int(h["resolution"]), h["label"])
            for h in self.hand_designed
        ]


__all__ = ["Candidate", "Gene", "SearchSpace"]
