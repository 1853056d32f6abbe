"""Which linear layers a quantization pass converts (spec 3.7, 7.3).

A filter list holds exact module names or `re:`-prefixed regular expressions (full match). Layers
matched by the list stay in high precision. NVFP4 keeps the conditioning/output layers and norms of
`NVFP4_DEFAULT_FILTERED` (the reference default, also spelled out in its NVFP4 DMD configs); FP8
keeps the six conditioning and output projections of `FP8_KEPT_BF16`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Iterator

from torch import nn

NVFP4_DEFAULT_FILTERED: tuple[str, ...] = (
    "text_embedding.0", "text_embedding.2", "patch_embedding", "time_projection.1", "time_embedding.0",
    "time_embedding.2", "head.head", "head.modulation",
    "re:.*norm_k$", "re:.*norm_q$", "re:.*norm1$", "re:.*norm2$", "re:.*norm3$",
)
FP8_KEPT_BF16: tuple[str, ...] = (
    "text_embedding.0", "text_embedding.2", "time_embedding.0", "time_embedding.2", "time_projection.1", "head.head",
)


@dataclass(frozen=True)
class ModuleFilter:
    """Exact names plus compiled regexes; `matches(name)` is true for layers to keep in high precision."""

    names: frozenset[str]
    patterns: tuple[re.Pattern, ...]

    @staticmethod
    def from_list(entries: Iterable[str] | None, source: str = "filtered_modules") -> "ModuleFilter":
        names, patterns = set(), []
        for i, entry in enumerate(entries or ()):
            if not isinstance(entry, str) or not entry:
                raise ValueError(f"{source}[{i}]: expected a module name or 're:<regex>', got {entry!r}")
            if entry.startswith("re:"):
                try:
                    patterns.append(re.compile(entry[3:]))
                except re.error as e:
                    raise ValueError(f"{source}[{i}]: invalid regular expression {entry[3:]!r}: {e}") from None
            else:
                names.add(entry)
        return ModuleFilter(frozenset(names), tuple(patterns))

    def matches(self, name: str) -> bool:
        return name in self.names or any(p.fullmatch(name) for p in self.patterns)


def nvfp4_filter(filtered_modules: Iterable[str] | None, use_default: bool = True,
                 source: str = "model_quant_filtered_modules") -> ModuleFilter:
    """The reference rule: the default list (when `use_default`) plus the configured entries."""
    entries = list(NVFP4_DEFAULT_FILTERED if use_default else ()) + list(filtered_modules or ())
    return ModuleFilter.from_list(entries, source)


def selected_linears(model: nn.Module, keep: ModuleFilter, multiple_of: int = 1) -> Iterator[tuple[str, nn.Linear]]:
    """The `nn.Linear` layers of `model` to convert: not kept by the filter, both dims divisible by `multiple_of`."""
    for name, module in model.named_modules():
        if type(module) is nn.Linear and not keep.matches(name):
            if module.in_features % multiple_of == 0 and module.out_features % multiple_of == 0:
                yield name, module


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Swap the submodule at dotted path `name` for `new`."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


__all__ = ["FP8_KEPT_BF16", "NVFP4_DEFAULT_FILTERED", "ModuleFilter", "nvfp4_filter", "replace_module", "selected_linears"]
