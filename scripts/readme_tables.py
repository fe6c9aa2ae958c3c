#!/usr/bin/env python3
"""Prints the README's measured tables (faithfulness to the reference, the other methods against
their references, bf16 fidelity, the resize) from one run of the tests that check them:

    python3 scripts/readme_tables.py

It runs `cargo test --release` on the golden, methods and resize tests with `--nocapture`, reads
the `| readme | table | row | column | value |` cells they print, and writes markdown tables to
stdout: copy them into the README as they are. Needs cargo; no Python package.
"""

import subprocess
import sys

COMMANDS = [
    ["cargo", "test", "--release", "--quiet", "--test", "library",
     "--", "--nocapture", "--test-threads", "1", "golden::", "methods::"],
    ["cargo", "test", "--release", "--quiet", "--lib", "golden_resize", "--", "--nocapture"],
]


def cells():
    out = []
    for cmd in COMMANDS:
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode != 0:
            sys.exit(f"{' '.join(cmd)} failed:\n{run.stdout}\n{run.stderr}")
        for line in (run.stdout + run.stderr).splitlines():
            parts = [p.strip() for p in line.strip().strip("|").split("|")]
            if len(parts) == 5 and parts[0] == "readme":
                out.append(parts[1:])
    return out


def table(rows, cols, header, cell):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        lines.append("| " + " | ".join([r] + [cell(r, c) for c in cols]) + " |")
    return "\n".join(lines)


def main():
    got = {}
    for t, r, c, v in cells():
        got.setdefault(t, {}).setdefault(r, {})[c] = v
    cases = ["vit_timm", "deit_distilled_timm", "vit_hf", "deit3_timm", "reg4_dinov2_timm",
             "clip_timm", "siglip_timm", "dinov2_hf"]

    g = got["golden"]
    cols = ["N", "probs", "feature maps", "masks", "saliency_sigma0.npy", "saliency_sigma0.1.npy"]
    print("Faithfulness to the reference (largest absolute differences):\n")
    print(table([c for c in cases], cols,
                ["case", "N", "probs", "feature maps", "masks", "saliency, noise 0",
                 "saliency, stored noise 0.1"],
                lambda r, c: g[r][c]))
    order = all(g[c]["masks in the reference's order"] == "true" for c in cases)
    print(f"\nMasks in the reference's cluster order in every case: {order}.\n")

    m = got["methods"]
    print("The other methods against their references (largest difference over the cases; "
          "Rollout not on siglip_timm, which has no [CLS]):\n")
    print("| check | largest difference |\n|---|---|")
    for row in m:
        worst = max(float(v) for v in m[row].values())
        print(f"| {row} | {f'{worst:.1e}'.replace('e-0', 'e-')} |")

    b = got["bf16"]
    print("\n`--precision bf16` against the reference's f32 map, same stored noise (Pearson):\n")
    print(" | ".join(f"{c} {b[c]['pearson']}" for c in cases))

    z = got["resize"]
    print("\nResize of the original JPEGs against the reference's image_224.png, values within 2 grey levels:\n")
    print(" | ".join(f"{c} {z[c]['within 2 grey levels']}" for c in cases if c in z))


if __name__ == "__main__":
    main()
