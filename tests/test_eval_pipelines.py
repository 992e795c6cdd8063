"""``stepsmith eval`` on a saved tiny Stable Diffusion pipeline folder: grids and CLIP score on the decoded
images, a guidance list in one report (same noises and conditions at every scale), and clear refusals
(no --clip-model; FID without --features). CLIP score is checked against the formula on a real (tiny,
random) CLIPModel call.
"""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from schedules.cli import main
from tests.tiny_pipelines import clip_tokenizer, sd_pipeline

torch.set_num_threads(1)

PROMPTS = ("a cat", "cat cat")
NUM = 4


@pytest.fixture(scope="module")
def clip_dir(vocab_dir, tmp_path_factory):
    """A tiny random CLIPModel + CLIPProcessor saved to a folder (loaded offline by the metric)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    torch.manual_seed(7)
    text = dict(vocab_size=600, hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4,
                max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4, image_size=16,
                  patch_size=8, num_channels=3)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()
    proc = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 16},
                                                            crop_size={"height": 16, "width": 16}),
                         tokenizer=clip_tokenizer(vocab_dir))
    folder = tmp_path_factory.mktemp("clip") / "tiny-clip"
    model.save_pretrained(folder)
    proc.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("prompts") / "p.txt"
    p.write_text("\n".join(PROMPTS) + "\n")
    return p


def common(sd_folder, prompts_file, guidance: str) -> list[str]:
    return ["eval", "--model", str(sd_folder), "--prompts", str(prompts_file), "--guidance", guidance, "--methods",
            "uniform", "--num", str(NUM), "--teacher-steps", "3", "--batch-size", "3"]


@pytest.fixture(scope="module")
def list_run(sd_folder, prompts_file, clip_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "list"
    rc = main([*common(sd_folder, prompts_file, "1,3"), "--nfe", "2,3", "--metric", "teacher,clip",
               "--clip-model", str(clip_dir), "--out", str(out)])
    return rc, out


def test_guidance_list_report_with_decoded_grids(list_run):
    rc, out = list_run
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert report["guidance"] == [1.0, 3.0] and report["metrics"] == ["teacher", "clip"]
    cells = sorted((r["guidance"], r["nfe"]) for r in report["results"])
    assert cells == [(1.0, 2), (1.0, 3), (3.0, 2), (3.0, 3)]
    assert [t["guidance"] for t in report["teachers"]] == [1.0, 3.0]
    for r in report["results"]:
        assert set(r["metrics"]) == {"teacher", "clip"} and 0 <= r["metrics"]["clip"] <= 100
        assert r["metrics"]["teacher"] == r["extra"]["teacher_mse"] > 0  # latent-space MSE to that scale's teacher
        img = Image.open(out / r["grid"])
        img.load()
        assert img.mode == "RGB"
    grids = {r["grid"] for r in report["results"]} | {t["grid"] for t in report["teachers"]}
    assert len(grids) == 6  # one file per (method, NFE, guidance) and one teacher per guidance
    # guidance changes the samples: the two scales' teacher samples differ
    assert report["teachers"][0]["metrics"]["clip"] != report["teachers"][1]["metrics"]["clip"]
    md = (out / "report.md").read_text()
    assert "## Per NFE and guidance" in md and "uniform (w=3)" in md and "decoded" in md


def test_same_noises_at_every_guidance(list_run, sd_folder, prompts_file, clip_dir, tmp_path):
    """A one-scale run at w=3 reproduces the w=3 rows of the list run: same noises, same conditions."""
    _, out = list_run
    listed = json.loads((out / "report.json").read_text())
    single = tmp_path / "single"
    assert main([*common(sd_folder, prompts_file, "3"), "--nfe", "2", "--metric", "teacher,clip",
                 "--clip-model", str(clip_dir), "--out", str(single)]) == 0
    one = json.loads((single / "report.json").read_text())
    row = next(r for r in listed["results"] if r["guidance"] == 3.0 and r["nfe"] == 2)
    assert one["results"][0]["guidance"] == 3.0
    for k in ("teacher", "clip"):
        assert one["results"][0]["metrics"][k] == pytest.approx(row["metrics"][k], rel=1e-5, abs=1e-6)
    assert one["teacher"]["metrics"]["clip"] == pytest.approx(listed["teachers"][1]["metrics"]["clip"], rel=1e-5)


def test_clip_score_is_the_formula(list_run, sd_folder, clip_dir):
    """The row's CLIP score = mean_i max(100·cos(E_img(image_i), E_txt(prompt_{i mod P})), 0) on the decoded samples."""
    from transformers import CLIPModel, CLIPProcessor

    from schedules.adapters import load_model
    from schedules.baselines import uniform
    from schedules.cli_sample import decode_latents
    from schedules.conditioning import Conditioning, bind
    from schedules.solvers import sample

    _, out = list_run
    report = json.loads((out / "report.json").read_text())
    row = next(r for r in report["results"] if r["guidance"] == 3.0 and r["nfe"] == 3)
    model = load_model(str(sd_folder), conditioning=Conditioning(prompts=PROMPTS, guidance=3.0))
    noise = model.noise(NUM, report["eval_seed"])
    with torch.no_grad(), bind(torch.arange(NUM)):
        x = sample(model, noise, uniform(model, 3, "euler").sigmas, "euler")
    images = decode_latents(model, x)
    pil = [Image.fromarray((im.permute(1, 2, 0).numpy() * 255).round().astype("uint8")) for im in images]
    clip = CLIPModel.from_pretrained(str(clip_dir)).eval()
    proc = CLIPProcessor.from_pretrained(str(clip_dir))
    texts = [PROMPTS[i % len(PROMPTS)] for i in range(NUM)]
    inputs = proc(text=texts, images=pil, return_tensors="pt", padding=True)
    with torch.no_grad():
        e_i = clip.get_image_features(pixel_values=inputs["pixel_values"])
        e_t = clip.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    e_i, e_t = (e if isinstance(e, torch.Tensor) else e.pooler_output for e in (e_i, e_t))  # transformers 4 / 5
    cos = torch.nn.functional.cosine_similarity(e_i, e_t, dim=-1)
    expected = float((100 * cos).clamp_min(0).mean())
    assert row["metrics"]["clip"] == pytest.approx(expected, rel=1e-4, abs=1e-4)
    assert float((100 * cos).abs().max()) > 0  # a real score, not a degenerate zero


def test_missing_clip_model_is_one_clear_line(sd_folder, prompts_file, tmp_path, capsys):
    rc = main([*common(sd_folder, prompts_file, "3"), "--nfe", "2", "--metric", "teacher,clip",
               "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "--clip-model" in err and "never downloads" in err
    assert not (tmp_path / "o").exists()


def test_fid_on_a_pipeline_needs_features(sd_folder, prompts_file, tmp_path, capsys):
    rc = main([*common(sd_folder, prompts_file, "3"), "--nfe", "2", "--metric", "fid", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "--features" in err and "decoded images" in err
    assert not (tmp_path / "o").exists()


def test_guidance_list_on_an_unconditional_model_is_refused(tmp_path, capsys):
    rc = main(["eval", "--model", "builtin:toy2d-flow", "--guidance", "1,3", "--methods", "uniform", "--nfe", "2",
               "--num", "8", "--metric", "teacher", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "unconditional" in err


def test_with_guidance_rebuilds_pipeline_adapters(vocab_dir):
    """with_guidance keeps ``.pipeline`` and goes through the pipeline adapter: SD = a fresh build at that scale;
    guidance-distilled Flux changes the embedded guidance, not CFG."""
    from schedules.conditioning import Conditioning, bind, with_guidance
    from schedules.pipeline_adapters import adapter_from_pipeline
    from tests.tiny_pipelines import flux_guidance_pipeline

    sd = sd_pipeline(vocab_dir)
    a = with_guidance(adapter_from_pipeline(sd, Conditioning(prompts=PROMPTS)), 3.0)
    fresh = adapter_from_pipeline(sd, Conditioning(prompts=PROMPTS, guidance=3.0))
    assert a.pipeline is sd and a.conditioning.guidance == 3.0 and a.conditioning.guided
    x, t = a.noise(2, 0), torch.full((2,), 500.0)
    with torch.no_grad(), bind(torch.arange(2)):
        torch.testing.assert_close(a.network(x, t), fresh.network(x, t))

    flux = flux_guidance_pipeline(vocab_dir)
    f = adapter_from_pipeline(flux, Conditioning(prompts=("a cat",), guidance=3.5, height=16, width=16))
    g = with_guidance(f, 2.0)
    assert g.pipeline is flux and g.sample_shape == f.sample_shape
    assert (f.conditioning.guidance, g.conditioning.guidance) == (1.0, 1.0)  # no CFG batch either way
    assert (f.conditioning.extra["distilled_guidance"], g.conditioning.extra["distilled_guidance"]) == (3.5, 2.0)
    y, s = f.noise(2, 0), torch.full((2,), 0.5)
    with torch.no_grad(), bind(torch.arange(2)):
        assert float((f.network(y, s) - g.network(y, s)).abs().max()) > 1e-4


def test_searched_methods_search_at_each_guidance(vocab_dir):
    """A searched method is searched once per guidance scale, on the model at that scale."""
    from eval.sweep import SweepConfig, check_config, current_dist, guidance_groups
    from schedules.conditioning import Conditioning
    from schedules.pipeline_adapters import adapter_from_pipeline

    adapter = adapter_from_pipeline(sd_pipeline(vocab_dir), Conditioning(prompts=PROMPTS))
    cfg = check_config(SweepConfig(methods=["dp"], nfe=[2], num=NUM, metric="teacher", guidance=[1, 3],
                                   search_samples=2, search_options={"grid": 10, "candidates": 3}), adapter)
    groups = guidance_groups(adapter, cfg, current_dist())
    assert [g.guidance for g in groups] == [1.0, 3.0]
    assert [g.cells[0].table.conditioning["guidance"] for g in groups] == [1.0, 3.0]
    assert all(g.adapter.pipeline is adapter.pipeline for g in groups)


FEATURES = '''
import torch
from torch import nn


class Pool(nn.Module):
    """Features of RGB 16x16 images: 4x4 average pooling, flattened (48-d)."""

    def forward(self, x):
        assert x.shape[1:] == (3, 16, 16), x.shape  # the decoded images, not the 4-channel latents
        return nn.functional.avg_pool2d(x, 4).flatten(1)


net = Pool()
'''


def test_fid_on_decoded_images_with_features_and_real(sd_folder, prompts_file, tmp_path):
    from schedules.io import save_safetensors

    (tmp_path / "feat.py").write_text(FEATURES)
    torch.manual_seed(0)
    save_safetensors(tmp_path / "real.safetensors", {"samples": torch.rand(8, 3, 16, 16) * 2 - 1})
    out = tmp_path / "o"
    assert main([*common(sd_folder, prompts_file, "3"), "--nfe", "2", "--metric", "fid", "--features",
                 f"{tmp_path / 'feat.py'}:net", "--real", str(tmp_path / "real.safetensors"), "--no-cache",
                 "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["real"]["feature_network"]["num_features"] == 48
    assert report["results"][0]["value"] > 0 and "decoded" in report["metric_space"]
