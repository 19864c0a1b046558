"""Encoder variants to compare, named by short keys that spell what they are.

    m2f                  Mask2Former: plan (0,0,6), no TRC, the 3x3 conv output (the base preset's encoder)
    p333                 PRO-SCALE (3,3,3): TRC (temperature 0.1, spatial layout) and LPE, as proscale_*_333
    p333-conv            ... with the 3x3 conv instead of LPE
    p333-notrc           ... without TRC
    p333-t1              ... TRC temperature 1.0
    p333-res             ... with RESIDUAL
    p204, p111-conv-notrc, ...   any plan (P1,P2,P3 digits) and any combination of the suffixes

Every variant is the base preset (e.g. m2f_nano) with `model_overrides` on its encoder, so all
of them share the backbone, decoder and heads: the comparison differs only in the encoder.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

_KEY = re.compile(r"^p(\d)(\d)(\d)((?:-(?:conv|notrc|res|t[0-9.]+))*)$")

# The default grid of `proscale tradeoff`: the baseline and, for each released plan, LPE or the
# 3x3 conv, with TRC on or off (docs/method.md).
DEFAULT_KEYS = ("m2f",) + tuple(f"p{p}{o}{t}" for p in ("111", "222", "333") for o in ("", "-conv")
                                for t in ("", "-notrc"))


@dataclass(frozen=True)
class Variant:
    key: str  # folder name and CLI name
    name: str  # for tables and plots
    overrides: tuple[str, ...]  # ModelConfig key=value items applied to the base preset
    plan: tuple[int, int, int]

    @property
    def is_baseline(self) -> bool:
        return self.key == "m2f"


def parse_variant(key: str) -> Variant:
    """The Variant a key names (see the module docstring); ValueError for a key it does not."""
    key = key.strip()
    if key == "m2f":
        return Variant("m2f", "Mask2Former", ("encoder.plan=0,0,6", "encoder.trc=false", "encoder.residual=false",
                                               "encoder.output=conv"), (0, 0, 6))
    m = _KEY.match(key)
    if not m:
        raise ValueError(f"unknown variant {key!r}: use m2f or p<P1><P2><P3>[-conv][-notrc][-res][-t<temperature>], "
                         f"e.g. p333, p222-conv, p333-t1")
    plan = tuple(int(d) for d in m.group(1, 2, 3))
    if sum(plan) == 0 or plan[2] == 0:
        raise ValueError(f"variant {key!r}: the plan needs layers in its last stage (all scales): got {plan}")
    flags = [f for f in m.group(4).split("-") if f]
    unknown_twice = [f for f in set(flags) if flags.count(f) > 1]
    if unknown_twice:
        raise ValueError(f"variant {key!r} repeats {unknown_twice}")
    trc = "notrc" not in flags
    temperature = next((float(f[1:]) for f in flags if f.startswith("t")), 0.1)
    output = "conv" if "conv" in flags else "lpe"
    residual = "res" in flags
    overrides = (f"encoder.plan={','.join(map(str, plan))}", f"encoder.trc={str(trc).lower()}",
                 f"encoder.trc_temperature={temperature}", "encoder.trc_layout=spatial",
                 f"encoder.residual={str(residual).lower()}", f"encoder.output={output}")
    parts = [f"PRO-SCALE ({','.join(map(str, plan))})", "3x3 conv" if output == "conv" else "LPE"]
    parts.append(f"TRC t={temperature:g}" if trc else "no TRC")
    if residual:
        parts.append("RESIDUAL")
    # The canonical key: the same variant always gets the same folder and name.
    canonical = (f"p{m.group(1)}{m.group(2)}{m.group(3)}" + ("-conv" if output == "conv" else "")
                 + ("" if trc else "-notrc") + ("-res" if residual else "") + ("" if temperature == 0.1 else f"-t{temperature:g}"))
    return Variant(canonical, parts[0] + " " + ", ".join(parts[1:]), overrides, plan)


def with_option(key: str, option: str) -> str:
    """The canonical key of variant `key` with `option` ("-conv", "-notrc", "-res") added."""
    return parse_variant(key + option).key


def parse_variants(text: str) -> list[Variant]:
    """Comma-separated keys; "default" stands for DEFAULT_KEYS. The baseline comes first."""
    keys: list[str] = []
    for item in (t.strip() for t in text.split(",")):
        for key in (DEFAULT_KEYS if item == "default" else (item,) if item else ()):
            if key not in keys:
                keys.append(key)
    variants = [parse_variant(k) for k in keys]
    if not variants:
        raise ValueError("no variant given")
    return sorted(variants, key=lambda v: not v.is_baseline)
