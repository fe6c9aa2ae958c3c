"""Writes the PyTorch checkpoints of tests/data/pickle/, read by tests/library/pickle.rs.

Run with a Python that has torch: `python scripts/make_pickle_fixtures.py`. Values are
`arange`-based so the tests can recompute them; every file is a few KB.
"""

import collections
import os
from pathlib import Path

import torch

OUT = Path(__file__).resolve().parent.parent / "tests" / "data" / "pickle"


def ramp(*shape, dtype=torch.float32):
    n = 1
    for d in shape:
        n *= d
    return (torch.arange(n, dtype=torch.float64) * 0.25 - 1.0).reshape(shape).to(dtype)


class Exploit:
    """The classic `__reduce__` payload: unpickling it with Python's pickle runs a command."""

    def __reduce__(self):
        return (os.system, ("touch /tmp/vitcx_pickle_fixture_marker",))


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    base = ramp(4, 6)
    sd = collections.OrderedDict()
    sd["f32"] = ramp(2, 3)
    sd["f16"] = ramp(3, 2, dtype=torch.float16)
    sd["bf16"] = ramp(5, dtype=torch.bfloat16)
    sd["f64"] = ramp(2, 2, dtype=torch.float64)
    sd["param"] = torch.nn.Parameter(ramp(1, 4))
    sd["transposed"] = base.t()  # column-major strides (Fortran order)
    sd["view_row"] = base[2]  # an offset into a storage shared with `transposed`
    sd["scalar"] = torch.tensor(1.5)
    sd["empty"] = torch.zeros(0, 3)
    sd["position_ids"] = torch.arange(4).unsqueeze(0)  # LongStorage buffer, dropped by vitcx
    torch.save(sd, OUT / "dtypes.pt")

    torch.save({"epoch": 3, "model": {"w": ramp(3)}}, OUT / "nested.pth")
    torch.save({"ints": torch.arange(3, dtype=torch.int32)}, OUT / "int_storage.pt")
    torch.save({"strided": base[:, ::2]}, OUT / "strided.pt")
    torch.save({"w": ramp(2), "payload": Exploit()}, OUT / "exploit.pt")


if __name__ == "__main__":
    main()
