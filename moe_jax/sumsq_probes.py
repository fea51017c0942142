"""The experts' weight-gradient sums of squares, from the grouped GEMMs' backward instead of a pass over
the gradients.

The optimizer's clip needs Σ g² over every gradient. For the experts' weights (w1 [E, D, n, F] and
w2 [E, F, D], the largest leaves of an MoE layer) that sum comes from the weight-gradient kernel's
epilogue (`ops.grouped_matmul`'s `sumsq_probe`): a probe is a float32 scalar input of the grouped GEMM
whose cotangent is defined as Σ dw². A caller that differentiates the layer with respect to a vector of
probes as well gets each expert weight's sum of squares as that vector's cotangent.

    with collecting(probes) as record:     # probes: [n] float32 (any values), a differentiated input
        y = layer(params, x)               # each GroupedExperts call takes two: `take(self)`
    record.complete                        # every probe taken once, by distinct experts modules

Outside `collecting`, `take` gives (None, None): the GEMMs get no probe and nothing changes. The record is
trace-time Python state: a layer traced inside `collecting` must call every experts module once, and the
caller checks `complete` before it trusts the probes' cotangents (a module that does not take them, e.g.
`SequentialExperts`, leaves the record incomplete and the caller sums those gradients itself).
"""
from __future__ import annotations

import contextlib
import dataclasses

import jax

# the parameter names whose gradients the probes stand for (GroupedExperts' two weights)
PROBED_NAMES = ("w1_EDnF", "w2_EFD")


@dataclasses.dataclass
class Record:
    probes: jax.Array
    owners: list = dataclasses.field(default_factory=list)  # id() of each module that took two probes
    duplicate: bool = False

    @property
    def complete(self) -> bool:
        return not self.duplicate and 2 * len(self.owners) == self.probes.shape[0]


_ACTIVE: list[Record] = []


@contextlib.contextmanager
def collecting(probes: jax.Array):
    """Hand `probes` [n] out, two per experts module, while the layer is traced inside."""
    record = Record(probes)
    _ACTIVE.append(record)
    try:
        yield record
    finally:
        _ACTIVE.pop()


def take(owner) -> tuple:
    """(w1's probe, w2's probe) for the experts module `owner`, or (None, None) outside `collecting` and
    past the probes there are."""
    if not _ACTIVE:
        return None, None
    record = _ACTIVE[-1]
    i = 2 * len(record.owners)
    if id(owner) in record.owners:
        record.duplicate = True
    if i + 2 > record.probes.shape[0]:
        record.duplicate = True  # more takers than probes: the caller's count was wrong
        return None, None
    record.owners.append(id(owner))
    return record.probes[i], record.probes[i + 1]


def is_probed(path) -> bool:
    """Whether a parameter leaf (its tree path, e.g. ['mlp']['experts']['w1_EDnF'].value) is one of the
    weights the probes stand for."""
    names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
    return bool(names) and names[-1] in PROBED_NAMES
