"""Build (and with ``--execute`` run and save, plots rendered) the notebooks of this folder.

    .venv/bin/python notebooks/build_notebooks.py --execute [--only conditional.ipynb]

The notebooks are generated from the cells below so that they stay reviewable as code; the
test suite (``tests/test_notebooks.py``) executes each of them from scratch.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent

QUICKSTART = [
    ("md", """# stepsmith quickstart: search → diffusers pipeline → FID

On the embedded `builtin:digits-flow` model (a diffusers `UNet2DModel` trained with flow matching on
scikit-learn's digits, 16×16): search a timestep table with dynamic programming, plug it into the
real diffusers pipeline with one call, and score it with FID against two hand-crafted baselines.
Small settings so it runs in about a minute on a CPU; `stepsmith quickstart` is the full-size job."""),
    ("code", """import warnings
warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm's notebook hint; bars are off below
import matplotlib.pyplot as plt
import torch

from schedules import load_model
from schedules.search import make_table

model = load_model("builtin:digits-flow")
print(model.describe())"""),
    ("md", """## 1. Search a table (offline, once)

`dp` runs the reference trajectories on a grid of σ, solves the Bellman recursion for every budget,
then refines the winner on the final error against the teacher. The options below shrink it for a
notebook (defaults: 64 samples, a 100-node grid). The table records its provenance."""),
    ("code", """NFE = 6
dp = make_table(model, "dp", NFE, "euler", samples=16, seed=0, grid=40, candidates=4, max_sweeps=1)
baselines = {name: make_table(model, name, NFE, "euler") for name in ("uniform", "karras")}
tables = {"dp": dp, **baselines}
for name, t in tables.items():
    print(f"{name:8s} sigmas", [round(s, 3) for s in t.sigmas])
print("search:", dp.provenance["model_calls"], "model calls,", dp.provenance["seconds"], "s")
dp.save("digits-flow-dp6.json")"""),
    ("md", """## 2. Plug it into the diffusers pipeline

`pipeline_kwargs(table, pipe)` returns the `sigmas=` / `timesteps=` arguments for this pipeline's
scheduler. A forward hook on the UNet checks that the pipeline evaluates the model exactly at the
table's timesteps, NFE times."""),
    ("code", """from schedules.diffusers import pipeline_kwargs
from schedules.embedded import embedded_path
from schedules.pipeline import UnconditionalFlowMatchPipeline
from diffusers.utils import logging as diffusers_logging

diffusers_logging.disable_progress_bar()
pipe = UnconditionalFlowMatchPipeline.from_pretrained(embedded_path("digits-flow"))
pipe.set_progress_bar_config(disable=True)
seen = []
hook = pipe.unet.register_forward_pre_hook(lambda mod, args: seen.append(float(args[1].flatten()[0])))
noise = model.noise(400, seed=10_000)          # held-out noises: the search used seed 0
samples = {}
for name, t in tables.items():
    seen.clear()
    samples[name] = pipe(batch_size=len(noise), latents=noise, output_type="latent",
                         **pipeline_kwargs(t, pipe)).images
    assert len(seen) == t.nfe and all(abs(a - b) < 1e-3 for a, b in zip(seen, t.timesteps)), (seen, t.timesteps)
hook.remove()
print({k: tuple(v.shape) for k, v in samples.items()})"""),
    ("md", """## 3. Score: FID on the digits feature network

Inception weights cannot be downloaded here, so the digits models are scored with the project's own
feature network (`digits-features`, a classifier's 128-d penultimate layer). The teacher (Heun, 20
steps) from the same noises is the floor."""),
    ("code", """from eval.features import load_feature_network
from eval.metrics import fid
from schedules.embedded.nets import digits_data
from schedules.solvers import reference_sample

real = digits_data()[0]
net = load_feature_network("digits-features")
with torch.no_grad():
    teacher = reference_sample(model, noise, 20)
scores = {name: fid(real, x.clamp(-1, 1), net) for name, x in samples.items()}
scores["teacher (39 NFE)"] = fid(real, teacher.clamp(-1, 1), net)
for name, v in scores.items():
    print(f"{name:16s} FID {v:8.1f}")
assert scores["dp"] < scores["karras"], scores"""),
    ("code", """from schedules.viz import image_grid

fig, axes = plt.subplots(1, 4, figsize=(13, 3.6))
for ax, (name, x) in zip(axes, [*samples.items(), ("teacher", teacher)]):
    ax.imshow(image_grid(x[:36], nrow=6, scale=2), cmap="gray")
    ax.set_title(f"{name}: FID {scores.get(name, scores['teacher (39 NFE)']):.0f}", fontsize=10)
    ax.axis("off")
plt.tight_layout()
plt.show()"""),
    ("code", """fig, ax = plt.subplots(figsize=(5, 3))
names = list(scores)
ax.bar(names, [scores[n] for n in names], color=["tab:green", "tab:blue", "tab:red", "k"])
ax.set_yscale("log")
ax.set_ylabel("FID (lower is better)")
ax.set_title(f"digits-flow, Euler, NFE {NFE}, N={len(noise)}")
plt.tight_layout()
plt.show()"""),
    ("md", """Next: `stepsmith eval --model builtin:digits-flow --methods dp,uniform,karras --nfe 4,6,8 --out runs/eval` sweeps
NFE with plots and image grids; `stepsmith bench` writes `BENCHMARKS.md`."""),
]

DISTILL = [
    ("md", """# Straightening a flow to its timestep table (BOSS) vs reflow

A table alone cannot remove the error of a curved flow at very low NFE. BOSS (Nguyen et al., *Bellman
Optimal Stepsize Straightening of Flow-Matching Models*, ICLR 2024) fine-tunes the velocity network so
that Euler along the DP table lands on the teacher's trajectory; reflow (Liu et al. 2022) straightens
the whole flow. Both train through the same model adapter that search and evaluation use. On the
embedded 2-D model, with a small budget so the notebook runs in about a minute on a CPU."""),
    ("code", """import warnings
warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm's notebook hint; bars are off below
import matplotlib.pyplot as plt
import torch

from distill import DistillConfig, distill
from eval.metrics import wasserstein
from schedules import load_model
from schedules.embedded.nets import toy2d_data
from schedules.search import make_table
from schedules.solvers import reference_sample, sample

teacher = load_model("builtin:toy2d-flow")
NFE = 2
table = make_table(teacher, "dp", NFE, "euler", samples=64, seed=0, free_start=False)
print("DP table:", [round(s, 3) for s in table.sigmas])"""),
    ("md", """## Train BOSS and reflow at the same budget

Same teacher trajectories (generated once and reused), optimizer steps, batch size and learning rate."""),
    ("code", """from distill.data import generate_teacher_data

budget = dict(steps=200, batch_size=256, lr=1e-3, warmup=20, pairs=2000, teacher_steps=50, progress=False)
data = generate_teacher_data(teacher, [table], budget["pairs"], seed=0, teacher_steps=budget["teacher_steps"])
students = {}
for method in ("boss", "reflow"):
    res = distill(teacher, table, DistillConfig(method=method, **budget), teacher_data=data)
    students[method] = res.adapter
    val = [h["val_loss"] for h in res.history if "val_loss" in h]
    print(method, "validation loss", round(val[0], 4), "→", round(val[-1], 4))"""),
    ("code", """noise = teacher.noise(2000, seed=10_000)
real = toy2d_data(2000, seed=10_001)
uniform = make_table(teacher, "uniform", NFE, "euler")
with torch.no_grad():
    ref = reference_sample(teacher, noise, 100)
    rows = {
        "teacher, uniform": sample(teacher, noise, uniform.sigmas, "euler"),
        "teacher, DP table": sample(teacher, noise, table.sigmas, "euler"),
        "reflow, uniform": sample(students["reflow"], noise, uniform.sigmas, "euler"),
        "BOSS, DP table": sample(students["boss"], noise, table.sigmas, "euler"),
    }
print(f"reference sampler (Heun 100 steps): W2 {wasserstein(ref, real):.3f}")
scores = {}
for name, x in rows.items():
    rmse = float(((x - ref) ** 2).mean().sqrt())
    scores[name] = wasserstein(x, real)
    print(f"{name:18s} NFE {NFE}: W2 {scores[name]:.3f}   RMSE to teacher {rmse:.3f}")
assert scores["BOSS, DP table"] < scores["teacher, DP table"], scores"""),
    ("code", """fig, axes = plt.subplots(1, len(rows) + 1, figsize=(16, 3.4), sharex=True, sharey=True)
for ax, (name, x) in zip(axes, [("teacher, Heun 100 steps", ref), *rows.items()]):
    ax.scatter(real[:, 0], real[:, 1], s=1, c="0.8")
    ax.scatter(x[:, 0], x[:, 1], s=1)
    ax.set_title(name, fontsize=9)
plt.tight_layout()
plt.show()"""),
    ("md", """From the command line, with checkpoints and `accelerate launch` for several GPUs:

    stepsmith search --model builtin:toy2d-flow --method dp --nfe 2 --solver euler --out t.json
    stepsmith distill --model builtin:toy2d-flow --table t.json --method boss --steps 2000 --out straight/

`python -m benchmarks.distill` compares BOSS, reflow and k-step distillation at equal budget."""),
]

CONDITIONAL = [
    ("md", """# Class-conditional sampling with guidance: search → pipeline → FID and class accuracy

`builtin:digits-cond` is a class-conditional flow-matching `UNet2DModel` (10 digits and a null label, trained with
label dropout so it supports classifier-free guidance, Ho & Salimans 2022) shipped as a diffusers folder with its
pipeline class, `ClassConditionalFlowMatchPipeline`. Guidance w mixes the conditional and the null-label outputs,
o = o_u + w·(o_c − o_u), in one batched call: it doubles the batch, not the NFE. This notebook searches a DP table at
guidance 3, plugs it into the pipeline, draws the same noises at guidance 1 and 3, and scores both with FID and the
digits classifier's class accuracy. Tiny settings so it runs in well under a minute on a CPU."""),
    ("code", """import warnings
warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm's notebook hint; bars are off below
import matplotlib.pyplot as plt
import torch

from schedules import load_model
from schedules.conditioning import Conditioning
from schedules.search import make_table

torch.set_num_threads(1)
model = load_model("builtin:digits-cond", conditioning=Conditioning(labels="all", guidance=3.0))
print(model.describe()["conditioning"])"""),
    ("md", """## 1. Search a table at guidance 3

Sample *i* of the search gets class *i* mod 10, every model call is the guided one. The table records what it was
searched for in its `conditioning` block: the guidance scale, the class set and the null label, with a
fingerprint of them. (Tiny search: 8 samples, a 20-node grid; the defaults are 64 samples and 100 nodes.)
The refinement's default objective (`feature-mse`) makes the table reproduce the guided teacher; `objective=
"data-fid"` would chase FID against the data instead, which at guidance 3 buys a lower FID with noisy images."""),
    ("code", """NFE = 4
dp = make_table(model, "dp", NFE, "euler", samples=8, seed=0, grid=20, candidates=3, max_sweeps=1)
print("dp sigmas", [round(s, 3) for s in dp.sigmas])
print("searched for", dp.conditioning)
print("search:", dp.provenance["model_calls"], "model calls,", dp.provenance["seconds"], "s")
print("saved", dp.save("digits-cond-dp4-w3.json"))"""),
    ("md", """## 2. Plug it into the model's diffusers pipeline, at guidance 1 and 3

`pipeline_kwargs(table, pipe, guidance_scale=w)` returns the pipeline's `sigmas=` for the table plus the guidance
scale. Asked for a guidance the table was not searched for, it warns: the steps still run exactly, they were just
optimised for another setting (search one per guidance scale you serve). Same labels, same noises, two scales."""),
    ("code", """from diffusers.utils import logging as diffusers_logging

from schedules.diffusers import pipeline_kwargs
from schedules.embedded import embedded_path
from schedules.embedded.cond_pipeline import ClassConditionalFlowMatchPipeline
from schedules.solvers import sample

diffusers_logging.disable_progress_bar()
pipe = ClassConditionalFlowMatchPipeline.from_pretrained(embedded_path("digits-cond"))
pipe.set_progress_bar_config(disable=True)
labels = list(range(10)) * 4                 # sample i gets class i mod 10, as in stepsmith
noise = model.noise(len(labels), seed=10_000)  # held-out noises: the search used seed 0
images = {}
for w in (1.0, 3.0):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kw = pipeline_kwargs(dp, pipe, guidance_scale=w)
    for c in caught:
        print(f"guidance {w:g}: warning:", c.message)
    images[w] = pipe(class_labels=labels, latents=noise, output_type="latent", **kw).images
print("pipeline kwargs at guidance 3:", kw)
with torch.no_grad():  # the pipeline runs exactly stepsmith's guided sampler along the table
    ours = sample(model, noise, dp.sigmas, "euler")
print("max |pipeline − stepsmith| at guidance 3:", float((images[3.0] - ours).abs().max()))
assert torch.allclose(images[3.0], ours, atol=1e-4)"""),
    ("code", """from schedules.viz import image_grid

fig, axes = plt.subplots(1, 2, figsize=(10, 4.6))
for ax, (w, x) in zip(axes, images.items()):
    ax.imshow(image_grid(x, nrow=10, scale=3), cmap="gray")
    ax.set_title(f"guidance {w:g}: columns are classes 0–9, same noises", fontsize=10)
    ax.axis("off")
plt.tight_layout()
plt.show()"""),
    ("md", """At guidance 1 the model samples its plain conditional distribution: some digits drift towards another class
or come out ambiguous. Guidance 3 pushes every sample away from the unconditional prediction, towards its class:
the digits are cleaner and unmistakable, but more alike within a class — guidance narrows each class. (Four steps
and a tiny search: some grain remains.)

## 3. Score: FID and class accuracy at both scales

`eval.sweep.run_sweep` with a guidance list scores every table at each scale from the same noises and conditions.
FID is on the project's digits feature network against the digits data (all classes, matching the 10 classes the
samples cycle through); class accuracy is the fraction of samples the digits classifier assigns to the class they
were asked for. N is small here, so the FIDs are noisy and biased upward — compare them within this table only.
*FID to teacher* is the same FID against the many-step guided sampler's own samples (from the same noises, at the
same scale): guidance moves the sampler's distribution away from the data, so this — not FID against the data — is
the distance a schedule can close."""),
    ("code", """from eval.sweep import run_sweep

uniform = make_table(model, "uniform", NFE, "euler")
report = run_sweep(model, tables=[("dp (searched at w=3)", dp), ("uniform", uniform)],
                   metric="fid,fid-teacher,class-accuracy", guidance=[1.0, 3.0], num=200, batch_size=200,
                   teacher_steps=20, progress=False)
print(f"{'table':22s} {'guidance':>8s} {'FID':>8s} {'FID to teacher':>15s} {'class accuracy':>15s}")
for r in report["results"]:
    m = r["metrics"]
    print(f"{r['label']:22s} {r['guidance']:8g} {m['fid']:8.1f} {m['fid-teacher']:15.2f} {m['class-accuracy']:15.3f}")
for t in report["teachers"]:
    print(f"{'teacher (Heun 20)':22s} {t['guidance']:8g} {t['metrics']['fid']:8.1f}")
cell = {(r["label"], r["guidance"]): r["metrics"] for r in report["results"]}
for w in (1.0, 3.0):
    ratio = cell["dp (searched at w=3)", w]["fid-teacher"] / cell["uniform", w]["fid-teacher"]
    print(f"guidance {w:g}: FID to teacher, dp ÷ uniform = {ratio:.2f}")
# guidance narrows each sample to its class
assert cell["dp (searched at w=3)", 3.0]["class-accuracy"] > cell["dp (searched at w=3)", 1.0]["class-accuracy"], cell"""),
    ("md", """Guidance trades diversity for fidelity to the class: class accuracy rises from guidance 1 to 3, while FID,
which also counts how much of each class's variety the samples cover, need not improve with it — compare FIDs at the
same guidance, not across scales. The dp ÷ uniform ratio says whether the table helps at each scale: its steps were
searched under guidance 3 (its `conditioning` block says so; `pipeline_kwargs` warned at guidance 1, and the sweep
warns for its guidance-1 rows), so at another scale it may lose to a plain baseline — search one per scale you serve.

From the command line:

    stepsmith search --model builtin:digits-cond --classes all --guidance 3 --method dp --nfe 4 --solver euler --out t.json
    stepsmith eval --model builtin:digits-cond --classes all --guidance 1,3 --methods dp,uniform --nfe 4,6,8 \\
        --metric fid,fid-teacher,class-accuracy --out runs/digits-cond"""),
]

NOTEBOOKS = {"quickstart.ipynb": QUICKSTART, "distillation.ipynb": DISTILL, "conditional.ipynb": CONDITIONAL}


def build(cells) -> nbformat.NotebookNode:
    nb = new_notebook(cells=[new_markdown_cell(src) if kind == "md" else new_code_cell(src) for kind, src in cells])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return nb


def execute(nb: nbformat.NotebookNode, cwd: Path, timeout: int = 600) -> nbformat.NotebookNode:
    from nbclient import NotebookClient

    NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()
    return nb


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--execute", action="store_true", help="run the notebooks and save them with outputs")
    p.add_argument("--only", action="append", choices=sorted(NOTEBOOKS), metavar="NAME",
                   help="build only this notebook (repeatable; default: all of them)")
    args = p.parse_args()
    import tempfile

    from schedules.io import atomic_write

    for name, cells in NOTEBOOKS.items():
        if args.only and name not in args.only:
            continue
        nb = build(cells)
        if args.execute:
            with tempfile.TemporaryDirectory() as tmp:
                execute(nb, Path(tmp))
        atomic_write(HERE / name, nbformat.writes(nb))
        print("wrote", HERE / name)


if __name__ == "__main__":
    main()
