"""The reference trainers (`vae`, `flow`) and `models:` on tiny real diffusers/transformers classes: each
loss is the direct computation on a fixed batch, latents read from shards equal what precache wrote and
what the flow trainer encodes on the fly, and the reduced demo pipeline runs end to end, writes sample
PNGs of the configured size, and resumes from its checkpoints to the same weights."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from typer.testing import CliRunner

from prep.cli import app
from prep.errors import PrepError, PrepErrorGroup
from prep.pipeline import parse_pipeline_config
from prep.pipeline.config import StepConfig
from prep.pipeline.models import build_models, init_seed
from prep.pipeline.orchestrator import StepContext
from prep.pipeline.trainers import FlowOptions, FlowTrainer, PatchDiscriminator, VAEOptions, VAETrainer
from prep.testing.pipeline_data import precached_shards

DEMO = Path(__file__).resolve().parents[2] / "configs" / "pipelines" / "demo.yaml"
TINY_VAE = {
    "latent_channels": 4,
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
    "block_out_channels": [8, 16],
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "scaling_factor": 0.5,
}
TINY_UNET = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [8, 16],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "layers_per_block": 1,
    "cross_attention_dim": 16,
    "attention_head_dim": 4,
    "norm_num_groups": 4,
}


NO_DATA = {"datasets": {"d": {"type": "prep", "path": "/no/such/folder"}}, "default_dataset": "d"}


def _cfg(models: dict, **extra):
    return parse_pipeline_config(
        {"models": models, "steps": [{"name": "s", "n_epochs": 1, "train": ["vae"]}], **NO_DATA, **extra}
    )


def _ctx(step: StepConfig, modules: dict, optimizers: dict | None = None) -> StepContext:
    return StepContext(step, 0, modules, modules, optimizers or {}, {}, torch.device("cpu"), 0, 1)


def test_models_section_random_init_is_seeded_per_name_and_leaves_the_rng():
    models = {"vae": {"class": "diffusers:AutoencoderKL", "config": TINY_VAE},
              "disc": {"class": "prep.pipeline.trainers:PatchDiscriminator", "options": {"channels": 4}}}
    cfg = _cfg(models, defaults={"seed": 5})
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = build_models(cfg)
    assert torch.equal(torch.get_rng_state(), before)
    b = build_models(_cfg({"vae": models["vae"]}, defaults={"seed": 5}))  # another module list, same vae
    assert type(a["vae"]).__name__ == "AutoencoderKL" and isinstance(a["disc"], PatchDiscriminator)
    assert all(torch.equal(p, q) for p, q in zip(a["vae"].parameters(), b["vae"].parameters(), strict=True))
    c = build_models(_cfg({"vae": models["vae"]}, defaults={"seed": 6}))
    assert not torch.equal(next(a["vae"].parameters()), next(c["vae"].parameters()))
    assert init_seed(5, "vae") != init_seed(5, "disc")


def test_models_section_errors_name_the_module():
    with pytest.raises(PrepErrorGroup) as err:
        build_models(_cfg({"vae": {"class": "diffusers:AutoencoderKL"},
                           "enc": {"class": "diffusers:NoSuchModel", "config": {}}}))
    text = "\n".join(e.what for e in err.value.errors)
    assert "models.vae: diffusers:AutoencoderKL needs `pretrained` or `config`" in text
    assert "models.enc: could not build diffusers:NoSuchModel" in text
    with pytest.raises(PrepErrorGroup) as err2:  # the schema: unknown keys, the class pattern
        _cfg({"vae": {"class": "AutoencoderKL", "pretrainde": "x"}})
    assert {e.what.split(":")[0] for e in err2.value.errors} == {"models.vae.class", "models.vae.pretrainde"}


@pytest.mark.parametrize("gan", [False, True])
def test_vae_loss_is_the_direct_computation(gan):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(**TINY_VAE)
    disc = PatchDiscriminator(channels=4, layers=2)
    d_opt = torch.optim.SGD(disc.parameters(), lr=0.0)  # stepped by the trainer; lr 0 keeps D as it was
    step = StepConfig(name="s", n_epochs=1, train_vae=True, gan_training=gan)
    trainer = VAETrainer(VAEOptions(loss="l2", kl_weight=0.01, gan_weight=0.5, discriminator="disc"))
    images = torch.rand(2, 3, 16, 16)
    torch.manual_seed(7)
    got = trainer.train_step({"jpg": images}, _ctx(step, {"vae": vae, "disc": disc}, {"disc": d_opt}))
    grads = [p.grad for p in vae.parameters()]
    assert all(g is not None for g in grads)
    torch.manual_seed(7)
    x = images * 2 - 1
    with torch.no_grad():
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        want = F.mse_loss(rec, x) + 0.01 * post.kl().mean()
        if gan:
            d_want = F.relu(1 - disc(x)).mean() + F.relu(1 + disc(rec)).mean()
            g_want = -disc(rec).mean()
            want = want + 0.5 * g_want
            assert torch.allclose(got["d_loss"], d_want, atol=1e-6)
            assert torch.allclose(got["g_loss"], g_want, atol=1e-6)
            assert all(p.requires_grad for p in disc.parameters())  # restored after the generator pass
    assert torch.allclose(got["vae_loss"], want, atol=1e-6), (got["vae_loss"], want)
    assert got["vae_loss"].item() > 0


def test_vae_refuses_spade_on_autoencoderkl():
    from diffusers import AutoencoderKL

    step = StepConfig(name="s", n_epochs=1, train_vae=True, train_spade=True)
    with pytest.raises(PrepError, match="no SPADE layers"):
        VAETrainer(VAEOptions()).train_step({"jpg": torch.rand(1, 3, 8, 8)},
                                            _ctx(step, {"vae": AutoencoderKL(**TINY_VAE)}))


def test_flow_loss_is_the_direct_computation(shards):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**TINY_UNET)
    cfg = _flow_cfg(shards, ["vae.npy", "clip.npy", "clip_mask.npy"])  # moments: the options' factors apply
    opts = FlowOptions(denoiser="unet", text_encoder=None, scaling_factor=0.7, shift_factor=0.1,
                       cfg_dropout=0.5)
    trainer = FlowTrainer(cfg, opts)
    moments = torch.randn(4, 8, 8, 8)
    emb = torch.randn(4, 5, 16)
    mask = torch.tensor([[1, 1, 1, 0, 0]] * 4, dtype=torch.bool)
    batch = {"vae.npy": moments, "clip.npy": emb, "clip_mask.npy": mask, "__key__": list("abcd")}
    torch.manual_seed(11)
    got = trainer.train_step(batch, _ctx(cfg.steps[0], {"unet": unet}))["flow_loss"]
    torch.manual_seed(11)
    mean, logvar = moments.chunk(2, dim=1)
    z = (mean + torch.exp(0.5 * logvar.clamp(-30, 20)) * torch.randn(mean.shape) - 0.1) * 0.7
    keep = (torch.rand(4) >= 0.5).float().view(4, 1, 1)
    noise = torch.randn(z.shape)
    t = torch.rand(4)
    tt = t.view(4, 1, 1, 1)
    with torch.no_grad():
        pred = unet((1 - tt) * z + tt * noise, t * 1000, encoder_hidden_states=emb * keep,
                    encoder_attention_mask=mask).sample
    want = F.mse_loss(pred, noise - z)
    assert torch.allclose(got, want, atol=1e-6), (got, want)
    assert all(p.grad is not None for p in unet.parameters() if p.requires_grad)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return precached_shards(tmp_path_factory.mktemp("demo"))


@pytest.mark.parametrize(
    ("text_class", "subfolder", "trains", "head"),
    [
        ("CLIPTextModel", "text_encoder", True, set()),
        ("CLIPTextModelWithProjection", "text_encoder", True, {"text_projection.weight"}),
        ("T5EncoderModel", "text_encoder_2", True, set()),
        ("CLIPTextModelWithProjection", "text_encoder", False, {"text_projection.weight"}),
    ],
)
def test_flow_freezes_the_text_encoder_parameters_its_embeddings_do_not_reach(
    shards, text_class, subfolder, trains, head
):
    """A text encoder the flow trainer trains keeps trainable exactly what its caption embeddings
    reach (DDP expects a gradient for every trainable parameter of a module it wraps): one backward of
    the embeddings gives each of them a gradient, and only what nothing reaches (a projection head)
    is frozen. A text encoder no step trains is left as built."""
    from prep.pipeline.trainers import build_reference

    folder = str(shards.parent / "models")
    models = {
        "vae": {"class": "diffusers:AutoencoderKL", "pretrained": folder, "subfolder": "vae"},
        "unet": {"class": "diffusers:UNet2DConditionModel", "config": TINY_UNET},
        "te": {"class": f"transformers:{text_class}", "pretrained": folder, "subfolder": subfolder},
    }
    optimizers = {"te" if trains else "unet": {"type": "SGD", "lr": 0.1}}
    step = {"name": "s", "n_epochs": 1, "train_diff_full": True, "optimization": {"optimizers": optimizers}}
    cfg = parse_pipeline_config({
        "models": models, "trainer_options": {"flow": {"denoiser": "unet", "text_encoder": "te"}},
        "steps": [step], **NO_DATA,
    })
    modules, trainers = build_reference(cfg)
    te = modules["te"]
    assert {n for n, p in te.named_parameters() if not p.requires_grad} == (head if trains else set())
    emb, _ = trainers["flow"].text({"txt": [b"a red cat", b"dog"]}, _ctx(cfg.steps[0], modules))
    emb.sum().backward()
    unreached = {n for n, p in te.named_parameters() if p.requires_grad and p.grad is None}
    assert unreached == (set() if trains else head)


def test_captions_encoded_on_the_fly_equal_the_precached_embeddings_whatever_they_were_precached_with(
    tmp_path,
):
    """A step that trains the text encoder encodes its captions itself; a step that does not reads
    clip.npy. Both must give the denoiser the same kind of embedding: on the fly follows what the
    manifest records (here max_length 20 and the penultimate layer, not the trainer's old fixed 32 and
    last layer), so with the weights precache used the two are the same numbers. A max_length option
    that says otherwise is refused at its line."""
    from prep.loaders import DataLoader, ShardDataset
    from prep.pipeline.trainers import build_reference

    shards = precached_shards(tmp_path, (4, 4), text_settings={"max_length": 20, "hidden_layer": -2})
    folder = str(tmp_path / "models")
    models = {
        "vae": {"class": "diffusers:AutoencoderKL", "pretrained": folder, "subfolder": "vae"},
        "unet": {"class": "diffusers:UNet2DConditionModel", "config": TINY_UNET},
        "te": {"class": "transformers:CLIPTextModel", "pretrained": folder, "subfolder": "text_encoder"},
    }
    step = {"name": "s", "n_epochs": 1, "train_diff_full": True,
            "optimization": {"optimizers": {"te": {"type": "SGD", "lr": 0.1}}}}
    doc = {"models": models, "trainer_options": {"flow": {"denoiser": "unet", "text_encoder": "te"}},
           "steps": [step], "datasets": {"d": {"type": "prep", "path": str(shards)}}, "default_dataset": "d"}
    cfg = parse_pipeline_config(doc)
    modules, trainers = build_reference(cfg)
    flow = trainers["flow"]
    assert flow.text_settings() == {"max_length": 20, "hidden_layer": -2, "use_attention_mask": False}
    ctx = _ctx(cfg.steps[0], modules)
    fields = ["clip.npy", "clip_mask.npy", "txt"]
    loader = DataLoader(ShardDataset(shards, batch_size=4, shuffle=False, fields=fields), num_workers=0)
    n = 0
    for batch in loader:
        precached = torch.as_tensor(batch["clip.npy"]).float()
        with torch.no_grad():
            on_the_fly, mask = flow.text({"txt": batch["txt"]}, ctx)
        assert on_the_fly.shape == precached.shape == (4, 20, 32)
        assert torch.equal(mask, torch.as_tensor(batch["clip_mask.npy"]).bool())
        assert torch.allclose(on_the_fly, precached, atol=1e-5), (on_the_fly - precached).abs().max()
        n += 1
    assert n == 2
    # the penultimate layer's embeddings never reach the last layer: frozen for DDP
    frozen = {k for k, p in modules["te"].named_parameters() if not p.requires_grad}
    assert "final_layer_norm.weight" in frozen and "encoder.layers.1.mlp.fc2.weight" in frozen
    assert "encoder.layers.0.mlp.fc2.weight" not in frozen
    doc["trainer_options"]["flow"]["max_length"] = 32
    with pytest.raises(PrepError, match=r"max_length: 32, but dataset 'd' holds 'clip' embeddings "
                                        r"precached with max_length 20") as err:
        build_reference(parse_pipeline_config(doc))[1]["flow"].text_settings()
    assert "set it to 20 or remove it" in err.value.fix


def test_latents_read_from_shards_equal_precache_and_on_the_fly(shards):
    """vae.npy read by the loader == the precache stage's VaeEncoder on the shard's own jpg, and the flow
    trainer's on-the-fly road (raw jpg bytes through the frozen VAE) gives the same moments."""
    from diffusers import AutoencoderKL

    from prep.loaders import DataLoader, ShardDataset

    vae = AutoencoderKL.from_pretrained(str(shards.parent / "models"), subfolder="vae").eval()
    cached = DataLoader(ShardDataset(shards, batch_size=5, shuffle=False, fields=["vae.npy"]), num_workers=0)
    raw = DataLoader(ShardDataset(shards, batch_size=5, shuffle=False, fields=["jpg"], decode="raw"),
                     num_workers=0)
    cfg = parse_pipeline_config({"steps": [{"name": "s", "n_epochs": 1, "train_diff": True}], **NO_DATA})
    trainer = FlowTrainer(cfg, FlowOptions(text_encoder=None, resolution=32))
    ctx = _ctx(cfg.steps[0], {"vae": vae})
    n = 0
    for a, b in zip(cached, raw, strict=True):
        assert a["__key__"] == b["__key__"]
        from_shard = trainer.moments(a, ctx)
        on_the_fly = trainer.moments(b, ctx)
        assert from_shard.shape == (5, 8, 16, 16)
        assert torch.allclose(from_shard, on_the_fly, atol=1e-5), (from_shard - on_the_fly).abs().max()
        n += 1
    assert n == 4


def _run(args: list[str]) -> None:
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output


REDUCE = [
    "training.pipeline.defaults.batch_size=4",
    "training.pipeline.datasets.images64.image_size=32",
    "training.pipeline.datasets.val64.image_size=32",
    "training.pipeline.steps.0.transition_on.threshold=10.0",  # fires at its first check (5 batches)
    "training.pipeline.steps.2.n_epochs=1",
    "training.pipeline.steps.2.sample_every=3ba",
    "training.pipeline.trainer_options.flow.sample_images=2",
]


@pytest.mark.slow
def test_reduced_demo_runs_end_to_end_and_resumes(shards, tmp_path, monkeypatch):
    monkeypatch.setenv("PREP_DEMO_OUT", str(shards.parent))
    sets = [x for s in REDUCE for x in ("--set", s)]
    whole, split = tmp_path / "whole", tmp_path / "split"
    _run(["pipeline", "run", str(DEMO), "--checkpoint-dir", str(whole), "--quiet", *sets])
    ends = sorted(p.name for p in whole.glob("step-*.pt"))
    assert [e.split("-", 3)[3] for e in ends] == ["vae_32px.pt", "vae_64px.pt", "flow.pt"]
    assert ends[0].startswith("step-000-000000000005-")  # the loss_threshold transition fired at 5 batches
    pngs = {p.name: p for p in (whole / "samples").glob("*.png")}
    sizes = {}
    for name, p in pngs.items():
        img = Image.open(io.BytesIO(p.read_bytes()))
        img.verify()
        sizes[name.split("-")[1]] = img.size
    assert sizes == {"vae_32px": (4 * 32, 2 * 32), "vae_64px": (4 * 32, 2 * 32), "flow": (2 * 32, 32)}
    # 16 samples / 4 = 4 batches: step 0 ends at 5, step 1 at 9; flow samples after its 3rd and at its end
    flow = sorted(n for n in pngs if "-flow-" in n)
    assert flow == ["02-flow-0000012-flow.png", "02-flow-0000013-flow.png"]
    # stopped twice (inside step 1, inside the flow step) and resumed: the same weights, the same pictures
    for stop in (3, 8, None):  # stops at global batches 3 and 11
        _run(["pipeline", "run", str(DEMO), "--checkpoint-dir", str(split), "--quiet", *sets,
              *(["--stop-after", str(stop)] if stop else [])])
    from prep.pipeline import checkpoint as ckpt

    a = ckpt.load(next(whole.glob("step-002-*.pt")))["modules"]
    b = ckpt.load(next(split.glob("step-002-*.pt")))["modules"]
    for m in a:
        for k in a[m]:
            assert torch.equal(a[m][k], b[m][k]), (m, k)
    for name, p in pngs.items():
        assert (split / "samples" / name).read_bytes() == p.read_bytes(), name
    assert np.asarray(Image.open(pngs[max(n for n in pngs if "-flow-" in n)])).std() > 0


@pytest.mark.slow
def test_example_with_custom_trainers_runs_the_demo(shards, tmp_path, monkeypatch):
    """examples/train_pipeline.py: the --entry path over the same YAML, with its own trainers."""
    monkeypatch.setenv("PREP_DEMO_OUT", str(shards.parent))
    monkeypatch.syspath_prepend(str(DEMO.parents[2] / "examples"))
    sets = [x for s in REDUCE for x in ("--set", s)]
    _run(["pipeline", "run", str(DEMO), "--entry", "train_pipeline:build", "--checkpoint-dir", str(tmp_path),
          "--quiet", *sets])
    assert len(list(tmp_path.glob("step-*.pt"))) == 3
    assert not (tmp_path / "samples").exists()  # its trainers have no sample()


def test_run_without_entry_names_what_is_missing():
    from prep.pipeline.trainers import build_trainers

    cfg = _cfg({"disc": {"class": "prep.pipeline.trainers:PatchDiscriminator"}})
    with pytest.raises(PrepError, match=r"the vae trainer needs module\(s\) 'vae'"):
        build_trainers(cfg, build_models(cfg))
    disc = {"disc": {"class": "prep.pipeline.trainers:PatchDiscriminator"}}
    mine = parse_pipeline_config({**NO_DATA, "models": disc,
                                  "steps": [{"name": "s", "n_epochs": 1, "train": ["mine"]}]})
    with pytest.raises(PrepError, match=r"no reference trainer for 'mine'.*--entry"):
        build_trainers(mine, {})
    bad = _cfg({"vae": {"class": "diffusers:AutoencoderKL", "config": TINY_VAE}},
               trainer_options={"vae": {"loss": "l3", "kl_wieght": 1}})
    with pytest.raises(PrepErrorGroup) as err:
        build_trainers(bad, build_models(bad))
    assert {e.what.split(":")[0] for e in err.value.errors} == {"trainer_options.vae.loss",
                                                               "trainer_options.vae.kl_wieght"}


def _flow_cfg(folder: Path, fields: list[str], val: Path | None = None):
    datasets = {"d": {"type": "prep", "path": str(folder), "fields": fields}}
    step = {"name": "s", "n_epochs": 1, "train_diff": True}
    if val is not None:
        datasets["v"] = {"type": "prep", "path": str(val), "fields": fields}
        step["validation"] = {"dataset": "v"}
    return parse_pipeline_config({"datasets": datasets, "default_dataset": "d", "steps": [step]})


def _first_batch(folder: Path, fields: list[str], **kw):
    from prep.loaders import DataLoader, ShardDataset

    return next(iter(DataLoader(ShardDataset(folder, batch_size=8, shuffle=False, fields=fields, **kw),
                                num_workers=0)))


def test_flow_reads_bfloat16_stored_latents_and_text_as_their_values(shards, tmp_path):
    """store_dtype: bfloat16 keeps uint16 bit patterns: the flow trainer sees the values (those of the
    float32 folder rounded to bfloat16), not the bits read as integers."""
    half = precached_shards(tmp_path, (4, 4), store_dtype="bfloat16")
    fields = ["vae.npy", "clip.npy", "clip_mask.npy"]
    bits, full = _first_batch(half, fields), _first_batch(shards, fields)
    assert bits["__key__"] == full["__key__"] and torch.as_tensor(bits["vae.npy"]).dtype == torch.uint16
    cfg = _flow_cfg(half, fields)
    trainer = FlowTrainer(cfg, FlowOptions(text_encoder=None))
    ctx = _ctx(cfg.steps[0], {})
    want = torch.as_tensor(full["vae.npy"]).to(torch.bfloat16).float()
    assert torch.equal(trainer.moments(bits, ctx), want)
    emb, mask = trainer.text(bits, ctx)
    assert torch.equal(emb, torch.as_tensor(full["clip.npy"]).to(torch.bfloat16).float())
    assert torch.equal(mask, torch.as_tensor(full["clip_mask.npy"]).bool())
    unrecorded = FlowTrainer(_flow_cfg(shards, fields), FlowOptions(text_encoder=None))  # float32 manifest
    with pytest.raises(PrepError, match=r"vae\.npy holds uint16 and no manifest"):
        unrecorded.moments(bits, _ctx(cfg.steps[0], {}))


@pytest.fixture(scope="module")
def mean_shards(tmp_path_factory):
    return precached_shards(tmp_path_factory.mktemp("mean"), (4, 4), latent_mode="mean")


def test_flow_latents_of_images_encoded_now_are_sampled_and_scaled_whatever_the_manifest_records(
    shards, mean_shards
):
    """A folder precached with latent_mode: mean, trained from its jpg: the trainer encodes moments now,
    and x_0 is their sample, scaled once (the folder's stored latents are not these)."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(str(shards.parent / "models"), subfolder="vae").eval()
    cfg = _flow_cfg(mean_shards, ["jpg"])
    trainer = FlowTrainer(cfg, FlowOptions(text_encoder=None, resolution=32))
    ctx = _ctx(cfg.steps[0], {"vae": vae})
    batch = _first_batch(mean_shards, ["jpg"], decode="raw")
    torch.manual_seed(3)
    got = trainer.latents(batch, ctx)
    torch.manual_seed(3)
    mean, logvar = trainer.moments(batch, ctx).chunk(2, dim=1)
    want = (mean + torch.exp(0.5 * logvar.clamp(-30, 20)) * torch.randn(mean.shape)) * 0.5  # the VAE's factor
    assert got.shape == (8, 4, 16, 16)
    assert torch.allclose(got, want, atol=1e-6)


def test_flow_latents_stored_scaled_are_scaled_once_with_the_factors_in_force(mean_shards):
    """latent_mode: mean latents were stored as (mean - shift) * scale with the manifest's factors: the
    flow sees them once scaled with the factors in force (the options' when given, else as stored), also
    when the options give both factors (the manifest's latent_mode is read all the same)."""
    fields = ["vae.npy"]
    cfg = _flow_cfg(mean_shards, fields)
    batch = _first_batch(mean_shards, fields)
    stored = torch.as_tensor(batch["vae.npy"]).float()
    assert stored.shape == (8, 4, 16, 16)
    ctx = _ctx(cfg.steps[0], {})
    for scale, shift in [(None, None), (0.5, 0.0), (0.25, 0.2), (0.8, None)]:
        trainer = FlowTrainer(cfg, FlowOptions(text_encoder=None, scaling_factor=scale, shift_factor=shift))
        mean = stored / 0.5  # the tiny VAE's scaling_factor, which precache recorded
        want = (mean - (shift or 0.0)) * (scale or 0.5)
        assert torch.allclose(trainer.latents(batch, ctx), want, atol=1e-6), (scale, shift)


class _PointNet(torch.nn.Module):
    """A velocity MLP over 3-d points (latents of shape 3 x 1 x 1), the time and a 2-d condition."""

    def __init__(self) -> None:
        super().__init__()
        self.f = torch.nn.Sequential(torch.nn.Linear(6, 64), torch.nn.SiLU(), torch.nn.Linear(64, 64),
                                     torch.nn.SiLU(), torch.nn.Linear(64, 3))

    def forward(self, x, t, encoder_hidden_states):
        b = x.shape[0]
        h = torch.cat([x.reshape(b, 3), t.view(b, 1) / 1000, encoder_hidden_states.reshape(b, 2)], 1)
        return self.f(h).view(b, 3, 1, 1)


class _IdentityDecoder(torch.nn.Module):
    def decode(self, z):
        return type("Out", (), {"sample": z})()


def test_flow_learns_two_points_and_its_sampler_lands_on_the_captioned_one(shards):
    """Rectified flow on a two-point distribution, each point with its own caption: the loss falls, and
    the sample grid's Euler integration (noise at t=1 to data at t=0) lands near each caption's point."""
    points = torch.tensor([[0.5, -0.5, 0.5], [-0.5, 0.5, -0.5]])
    cfg = _flow_cfg(shards, ["vae.npy", "clip.npy"])  # its manifest: moments (the options' factors apply)
    opts = FlowOptions(denoiser="net", text_encoder=None, scaling_factor=1.0, shift_factor=0.0,
                       cfg_dropout=0.0, sample_steps=20, guidance=1.0, sample_images=2)
    trainer = FlowTrainer(cfg, opts)
    torch.manual_seed(0)
    net = _PointNet()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    ctx = _ctx(cfg.steps[0], {"net": net, "vae": _IdentityDecoder()})
    which = torch.tensor([0, 1] * 16)
    batch = {"vae.npy": torch.cat([points[which], torch.full((32, 3), -30.0)], 1).view(32, 6, 1, 1),
             "clip.npy": F.one_hot(which, 2).float().view(32, 1, 2)}
    losses = []
    for _ in range(600):
        losses.append(float(trainer.train_step(batch, ctx)["flow_loss"]))
        opt.step()
        opt.zero_grad()
    assert np.mean(losses[-20:]) < 0.25 * np.mean(losses[:20])
    with torch.no_grad():
        picture = trainer.sample(ctx)  # one row: caption 0's sample, then caption 1's
    got = torch.from_numpy(picture.reshape(2, 3).astype(np.float32)) / 127.5 - 1
    assert (got - points).abs().max() < 0.25, got


def test_gan_generator_step_gives_the_discriminator_no_gradient_and_kl_is_the_closed_form():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae, disc = AutoencoderKL(**TINY_VAE), PatchDiscriminator(channels=4, layers=2)
    twin = PatchDiscriminator(channels=4, layers=2)
    twin.load_state_dict(disc.state_dict())
    step = StepConfig(name="s", n_epochs=1, train_vae=True, gan_training=True, grad_accumulation=2)
    ctx = _ctx(step, {"vae": vae, "disc": disc}, {"disc": torch.optim.SGD(disc.parameters(), lr=0.1)})
    ctx.boundary = False  # mid-window: the discriminator keeps its gradient, which must be d_loss's alone
    images = torch.rand(2, 3, 16, 16)
    torch.manual_seed(3)
    VAETrainer(VAEOptions(discriminator="disc")).train_step({"jpg": images}, ctx)
    torch.manual_seed(3)
    x = images * 2 - 1
    post = vae.encode(x).latent_dist
    rec = vae.decode(post.sample()).sample.detach()
    ((F.relu(1 - twin(x)).mean() + F.relu(1 + twin(rec)).mean()) / 2).backward()
    for a, b in zip(disc.parameters(), twin.parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, atol=1e-7)
    mu, logvar = post.mean, post.logvar
    closed = (0.5 * (mu**2 + logvar.exp() - 1 - logvar)).sum(dim=(1, 2, 3)).mean()
    assert torch.allclose(post.kl().mean(), closed)


@pytest.mark.parametrize("scale", [None, 0.8])
def test_flow_validation_reads_its_own_manifest_and_brings_latents_to_the_factors_in_force(
    shards, tmp_path, scale
):
    """Training on moments (float32, the VAE's factors), validating on a folder of the same images
    precached as means with other factors, stored as bfloat16 bits: validation's x_0 is the training
    folder's mean under the factors in force (the training data's, or the options'), and its loss is
    the rectified-flow loss of that x_0. A validation folder of another VAE is refused in one line."""
    from diffusers import UNet2DConditionModel

    val = precached_shards(tmp_path / "val", (4, 4), latent_mode="mean", store_dtype="bfloat16",
                           scaling_factor=0.25, shift_factor=0.1)
    fields = ["vae.npy", "clip.npy", "clip_mask.npy"]
    cfg = _flow_cfg(shards, fields, val=val)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**{**TINY_UNET, "cross_attention_dim": 32})
    trainer = FlowTrainer(cfg, FlowOptions(denoiser="unet", text_encoder=None, scaling_factor=scale))
    ctx = _ctx(cfg.steps[0], {"unet": unet})
    train_batch, val_batch = _first_batch(shards, fields), _first_batch(val, fields)
    assert train_batch["__key__"] == val_batch["__key__"]
    trainer.train_step(train_batch, ctx)
    mean = trainer.moments(train_batch, ctx).chunk(2, dim=1)[0]
    want = mean * (scale or 0.5)  # the training folder's factors: scale 0.5 (the tiny VAE's), shift 0
    got = trainer.latents(val_batch, ctx, val=True)
    assert torch.allclose(got, want, rtol=2e-2, atol=2e-2), (got - want).abs().max()
    with torch.no_grad():
        loss = trainer.val_step(val_batch, ctx)["flow_loss"]
        keys = ",".join(val_batch["__key__"]).encode()
        torch.manual_seed(int.from_bytes(hashlib.sha256(keys).digest()[:8], "little") >> 1)
        emb, mask = trainer.text(val_batch, ctx, val=True)
        assert torch.allclose(loss, trainer.loss(ctx, got, emb, mask, 0.0), atol=1e-6)

    from prep.testing.tiny_models import write_tiny_vae

    write_tiny_vae(tmp_path / "other" / "models" / "vae", latent_channels=4, scaling_factor=0.3)
    other = precached_shards(tmp_path / "other", (4, 4), latent_mode="mean")
    cfg = _flow_cfg(shards, fields, val=other)
    trainer = FlowTrainer(cfg, FlowOptions(denoiser="unet", text_encoder=None))
    with pytest.raises(PrepError, match=r"validation dataset 'v' holds 'vae' latents of another VAE") as err:
        trainer.val_step(_first_batch(other, fields), _ctx(cfg.steps[0], {"unet": unet}))
    assert "\n" not in err.value.line() and err.value.what.startswith("steps.0.validation.dataset: ")


EMA_RUN = """\
models:
  vae: {class: "diffusers:AutoencoderKL", config: VAE}
trainer_options: {vae: {sample_images: 2}}
datasets:
  d: {type: prep, path: DATA, fields: [jpg], decode: float, image_size: 16, seed: 3}
default_dataset: d
defaults: {workers: 0, seed: 1, batch_size: 4}
steps:
  - name: v
    train_vae: true
    max_steps: 4
    optimization: {optimizers: {vae: {type: AdamW, lr: 0.01}}}
    ema: {decay: DECAY, use_for_samples: USE, use_for_validation: USE}
    validation: {dataset: d, every: 2ba, limit_val_batches: 1}
    checkpoint_every: 1ba
    sample_every: 2ba
"""


def _png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(path.read_bytes())))


@pytest.mark.slow
def test_samples_and_validation_use_the_ema_weights_and_leave_training_as_it_was(tmp_path):
    """With ema on, every sample grid is the trainer's sample of the EMA's weights (computed here from
    the checkpoint's EMA), and validation's metrics are the EMA's; other decays give other grids; with
    use_for_samples / use_for_validation false they are the live weights'; the trained weights are
    bitwise the same either way, and a resumed run writes the same grids and weights bitwise."""
    import json

    from prep.pipeline import checkpoint as ckpt
    from prep.testing.loader_data import make_shards

    make_shards(tmp_path / "data", [8, 8], image_size=16, distinct_images=16)

    def run(name: str, decay: float, use: bool, stops: tuple[int | None, ...] = (None,)) -> Path:
        config = tmp_path / f"{name}.yaml"
        config.write_text(EMA_RUN.replace("DATA", str(tmp_path / "data")).replace("VAE", json.dumps(TINY_VAE))
                          .replace("DECAY", str(decay)).replace("USE", str(use).lower()))
        for stop in stops:
            _run(["pipeline", "run", str(config), "--checkpoint-dir", str(tmp_path / name), "--quiet",
                  *(["--stop-after", str(stop)] if stop else [])])
        return tmp_path / name

    slow, fast, live = run("slow", 0.999, True), run("fast", 0.01, True), run("live", 0.999, False)
    split = run("split", 0.999, True, stops=(1, 2, None))
    cfg = parse_pipeline_config(tmp_path / "slow.yaml")
    grids = sorted(p.name for p in (slow / "samples").glob("*.png"))
    assert grids == ["00-v-0000002-vae.png", "00-v-0000004-vae.png"]
    end = {n: ckpt.load(next(f.glob("step-000-*.pt"))) for n, f in
           {"slow": slow, "fast": fast, "live": live, "split": split}.items()}
    for other in ("fast", "live", "split"):  # samples never touch the trained weights
        for k, v in end["slow"]["modules"]["vae"].items():
            assert torch.equal(v, end[other]["modules"]["vae"][k]), (other, k)
    for name in grids:  # a resumed run: the same grids, bitwise
        assert (split / "samples" / name).read_bytes() == (slow / "samples" / name).read_bytes()

    def weights(state: dict, which: str) -> torch.nn.Module:
        vae = build_models(cfg)["vae"].eval()
        vae.load_state_dict(state["modules"]["vae"] if which == "live" else {
            k.removeprefix("module."): v for k, v in state["ema"]["vae"].items() if k.startswith("module.")})
        return vae

    def picture(state: dict, which: str) -> np.ndarray:
        trainer = VAETrainer(VAEOptions(sample_images=2))
        trainer.load_state_dict(state["trainers"]["vae"])
        with torch.no_grad():
            return trainer.sample(_ctx(cfg.steps[0], {"vae": weights(state, which)}))

    from prep.pipeline.data import build_loader

    val_batch = next(iter(build_loader(cfg, "d")[0]))  # validation reads the set from its start
    for name, which in (("slow", "ema"), ("fast", "ema"), ("live", "live")):
        ctx = _ctx(cfg.steps[0], {"vae": weights(end[name], which)})
        with torch.no_grad():
            want = VAETrainer(VAEOptions()).val_step(val_batch, ctx)
        got = json.loads(end[name]["meta"])["metrics"]["val"]
        assert got == pytest.approx({k: float(v) for k, v in want.items()}, rel=1e-5), name

    last = grids[-1]
    for name, folder in (("slow", slow), ("fast", fast)):
        assert np.array_equal(_png(folder / "samples" / last), picture(end[name], "ema")), name
    assert np.array_equal(_png(live / "samples" / last), picture(end["live"], "live"))
    assert not np.array_equal(_png(slow / "samples" / last), _png(fast / "samples" / last))
    assert not np.array_equal(_png(slow / "samples" / last), _png(live / "samples" / last))


def _untrained_cfg(shards: Path):
    """A denoiser step (only the UNet has an optimizer; the VAE and the text encoder are in `models:`
    and in no `freeze`), then a step that trains the text encoder alone."""
    folder = str(shards.parent / "models")
    fields = ["vae.npy", "clip.npy", "clip_mask.npy", "txt"]
    return parse_pipeline_config({
        "models": {
            "vae": {"class": "diffusers:AutoencoderKL", "pretrained": folder, "subfolder": "vae"},
            "unet": {"class": "diffusers:UNet2DConditionModel",
                     "config": {**TINY_UNET, "cross_attention_dim": 32}},
            "te": {"class": "transformers:CLIPTextModel", "pretrained": folder, "subfolder": "text_encoder"},
        },
        "trainer_options": {"flow": {"denoiser": "unet", "text_encoder": "te", "sample_images": 2}},
        "datasets": {"d": {"type": "prep", "path": str(shards), "fields": fields}},
        "default_dataset": "d",
        "defaults": {"workers": 0, "seed": 0, "batch_size": 4},
        "steps": [
            {"name": "denoiser", "train_diff": True, "max_steps": 4, "checkpoint_every": "1ba",
             "optimization": {"optimizers": {"unet": {"type": "SGD", "lr": 0.1}}}},
            {"name": "text", "train_diff_full": True, "max_steps": 2,
             "optimization": {"optimizers": {"te": {"type": "SGD", "lr": 0.5}}}},
        ],
    })


Event = tuple[int, str, bool, dict[str, tuple[bool, bool]]]


def _watched_run(cfg, folder: Path, events: list[Event], max_batches: int | None = None) -> dict:
    """A run of `cfg` by the reference trainers whose UNet and text encoder log every forward: (step
    index, module, gradients on, each module's (training, any parameter requires_grad))."""
    from prep.pipeline.orchestrator import TrainingPipelineOrchestrator
    from prep.pipeline.trainers import build_reference

    modules, trainers = build_reference(cfg)
    orch = TrainingPipelineOrchestrator(cfg, modules, trainers, folder, progress=False)

    def watch(name: str):
        def hook(module, args, out) -> None:
            flags = {n: (m.training, any(p.requires_grad for p in m.parameters()))
                     for n, m in modules.items()}
            events.append((orch.state.step_index, name, torch.is_grad_enabled(), flags))
        return hook

    for name in ("unet", "te"):
        modules[name].register_forward_hook(watch(name))
    orch.run(max_batches=max_batches)
    return modules


def test_modules_no_optimizer_trains_are_frozen_and_the_flow_reads_the_precached_text(shards, tmp_path):
    """In a step whose optimizers train the denoiser alone, the VAE and the text encoder (not in
    `freeze`) are frozen: requires_grad False, eval(), no gradient, weights bitwise as loaded, and the
    flow trainer reads the precached clip.npy (the text encoder's forward never runs). The next step,
    whose optimizer trains the text encoder, encodes captions through it in train() and moves it;
    stopped and resumed twice inside the first step, the run sets the same flags and ends bitwise the
    same."""
    from prep.pipeline import checkpoint as ckpt

    cfg = _untrained_cfg(shards)
    initial = {n: {k: v.clone() for k, v in m.state_dict().items()} for n, m in build_models(cfg).items()}
    frozen = {"unet": (True, True), "te": (False, False), "vae": (False, False)}
    text = {"unet": (False, False), "te": (True, True), "vae": (False, False)}
    events: list[Event] = []
    _watched_run(cfg, tmp_path / "whole", events)
    assert [e[1:] for e in events if e[0] == 0 and e[2]] == [("unet", True, frozen)] * 4
    assert not [e for e in events if e[0] == 0 and e[1] == "te"]  # not even for the step's samples
    assert [e[1:] for e in events if e[0] == 1 and e[1] == "te" and e[2]] == [("te", True, text)] * 2
    ends = [ckpt.load(next((tmp_path / "whole").glob(f"step-00{i}-*.pt")))["modules"] for i in (0, 1)]

    def same(state: dict, name: str) -> bool:
        return all(torch.equal(v, initial[name][k]) for k, v in state[name].items())

    assert same(ends[0], "te") and same(ends[0], "vae") and not same(ends[0], "unet")
    assert not same(ends[1], "te") and same(ends[1], "vae")
    assert all(torch.equal(v, ends[0]["unet"][k]) for k, v in ends[1]["unet"].items())

    split: list[Event] = []
    for stop in (2, 1):  # inside the first step, from a fresh process's view each time
        modules = _watched_run(cfg, tmp_path / "split", split, max_batches=stop)
        for name in ("te", "vae"):  # a module no optimizer steps gathers no gradient
            assert all(p.grad is None and not p.requires_grad for p in modules[name].parameters()), name
            assert not modules[name].training
    _watched_run(cfg, tmp_path / "split", split)
    assert [e[1:] for e in split if e[0] == 0 and e[2]] == [("unet", True, frozen)] * 4
    assert not [e for e in split if e[0] == 0 and e[1] == "te"]
    resumed = ckpt.load(next((tmp_path / "split").glob("step-001-*.pt")))["modules"]
    for name, state in ends[1].items():
        assert all(torch.equal(v, resumed[name][k]) for k, v in state.items()), name
