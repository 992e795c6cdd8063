"""Sample quality of ``builtin:digits-cond``: class accuracy of the intended label, by the digits classifier.

    python -m schedules.embedded.check_cond --num 500 --steps 20 --guidance 1,3 --threads 1

Samples ``num`` images (label i mod 10 for sample i, noise seed 10 000) with Heun along the
convention's reference grid of ``steps`` steps, classifies them with the embedded
``digits-features`` network (held-out accuracy on real digits in its training.json) and records
the accuracy per guidance scale in ``digits-cond/training.json`` under ``"quality"``.
"""

from __future__ import annotations

import argparse
import json

import torch

from schedules.embedded import embedded_path
from schedules.embedded.nets import DigitsFeatures
from schedules.io import atomic_write_json, load_safetensors


def digits_classifier() -> DigitsFeatures:
    net = DigitsFeatures()
    net.load_state_dict(load_safetensors(embedded_path("digits-features") / "model.safetensors"))
    return net.eval()


@torch.no_grad()
def class_accuracy(guidance: float, num: int, steps: int, seed: int = 10_000, batch: int = 100) -> float:
    """Fraction of ``num`` digits-cond samples at ``guidance`` classified as their intended label."""
    from schedules.adapters import load_model
    from schedules.conditioning import Conditioning, bind, micro_batches
    from schedules.solvers import sample

    model = load_model("builtin:digits-cond", conditioning=Conditioning(labels="all", guidance=guidance))
    noise = model.noise(num, seed)
    sig = model.convention.reference_sigmas(steps)
    xs = []
    for sl in micro_batches(num, batch):
        with bind(sl):
            xs.append(sample(model, noise[sl], sig, "heun"))
    pred = digits_classifier().classify(torch.cat(xs).clamp(-1, 1)).argmax(1)
    want = model.conditioning.labels_of(torch.arange(num))
    return float((pred == want).double().mean())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num", type=int, default=500)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", default="1,3")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    acc = {g: round(class_accuracy(float(g), a.num, a.steps), 4) for g in a.guidance.split(",")}
    quality = {"class_accuracy": acc, "num": a.num, "solver": f"heun-{a.steps}@reference", "seed": 10_000,
               "classifier": "builtin:digits-features",
               "command": f"python -m schedules.embedded.check_cond --num {a.num} --steps {a.steps} "
                          f"--guidance {a.guidance} --threads {a.threads}"}
    info_file = embedded_path("digits-cond") / "training.json"
    info = json.loads(info_file.read_text())
    info["quality"] = quality
    atomic_write_json(info_file, info)
    print(json.dumps(quality, indent=2))


if __name__ == "__main__":
    main()
