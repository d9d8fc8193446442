"""A pipeline under a real torchrun (gloo, CPU): saved mid-step on 2 ranks, then resumed on 2 ranks and
on 1 rank (with the same global batch): the global sample stream is the uninterrupted one. Saved on 1
rank and resumed on 3: the ranks the checkpoint has no RNG state for get streams of their own. The
reference VAE trainer's GAN step, and the flow trainer training its text encoder, on 2 ranks: every rank
holds the same weights, those of 1 rank."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from prep.testing.loader_data import make_shards
from prep.testing.pipeline_data import pipeline_run_args

SRC = Path(__file__).resolve().parents[2] / "src"
CONFIG = """\
datasets:
  d: {type: prep, path: DATA, decode: raw, seed: 5}
default_dataset: d
defaults: {workers: 0, seed: 1}
steps:
  - name: only
    max_steps: 8
    train: [reg]
    optimization: {optimizers: {all: {type: SGD, lr: 0.05, params: [enc, dec]}}}
    checkpoint_every: 1ba
"""


def _run(nproc: int, config: Path, folder: Path, log: Path, batch: int, *extra: str,
         entry: str = "prep.testing.pipeline_data:build") -> None:
    env = {
        **os.environ,
        "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "OMP_NUM_THREADS": "1",
        "GLOO_SOCKET_IFNAME": "lo",
        "PREP_TEST_KEY_LOG": str(log),
        "PREP_TEST_WEIGHTS": str(log),
    }
    head = (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m"]
        if nproc > 1
        else [sys.executable, "-m"]
    )
    cmd = [
        *head,
        "prep.cli",
        *pipeline_run_args(config, folder, "--set", f"steps.0.batch_size={batch}", *extra, entry=entry),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _stream(log: Path, world: int) -> dict[int, list[str]]:
    """Global batch number -> its keys, rank slices joined in rank order."""
    per_rank = [
        [json.loads(ln) for ln in Path(f"{log}.rank{r}").read_text().splitlines()] for r in range(world)
    ]
    out: dict[int, list[str]] = {}
    for docs in per_rank:
        for d in docs:
            out.setdefault(d["batch"], []).extend(d["keys"])
    return out


@pytest.mark.slow
def test_two_ranks_saved_then_resumed_on_two_and_on_one(tmp_path):
    make_shards(tmp_path / "data", [9, 6, 8, 7, 5], image_size=8, distinct_images=1)
    config = tmp_path / "p.yaml"
    config.write_text(CONFIG.replace("DATA", str(tmp_path / "data")))

    _run(1, config, tmp_path / "ref", tmp_path / "ref.log", 4)
    want = _stream(tmp_path / "ref.log", 1)
    assert sorted(want) == list(range(8)) and all(len(k) == 4 for k in want.values())

    _run(2, config, tmp_path / "first", tmp_path / "first.log", 2, "--stop-after", "3")
    first = _stream(tmp_path / "first.log", 2)
    assert first == {b: want[b] for b in range(3)}
    shutil.copytree(tmp_path / "first", tmp_path / "on1")

    _run(2, config, tmp_path / "first", tmp_path / "on2.log", 2)
    assert _stream(tmp_path / "on2.log", 2) == {b: want[b] for b in range(3, 8)}

    _run(1, config, tmp_path / "on1", tmp_path / "on1.log", 4)  # 1 rank, same global batch of 4
    assert _stream(tmp_path / "on1.log", 1) == {b: want[b] for b in range(3, 8)}


def _draws(log: Path, rank: int) -> dict[int, list[float]]:
    """Global batch -> the (python, numpy, torch) numbers the rank drew at it."""
    docs = [json.loads(ln) for ln in Path(f"{log}.rank{rank}").read_text().splitlines()]
    return {d["batch"]: d["draws"] for d in docs}


@pytest.mark.slow
def test_ranks_added_on_resume_draw_streams_of_their_own(tmp_path):
    """Saved on 1 rank, resumed on 3 (the same global batch of 3), twice from the same checkpoint: ranks 1
    and 2, which it has no RNG state for, draw python, numpy and torch numbers that no other rank draws
    (they were rank 0's copies), the same in both resumes; rank 0 continues its saved streams, and a
    resume on 1 rank draws exactly what the uninterrupted run drew."""
    make_shards(tmp_path / "data", [9, 6, 8, 7, 5], image_size=8, distinct_images=1)
    config = tmp_path / "p.yaml"
    config.write_text(CONFIG.replace("DATA", str(tmp_path / "data")))
    _run(1, config, tmp_path / "ref", tmp_path / "ref.log", 3)
    want = _draws(tmp_path / "ref.log", 0)
    _run(1, config, tmp_path / "first", tmp_path / "first.log", 3, "--stop-after", "2")
    for copy in ("same", "a", "b"):
        shutil.copytree(tmp_path / "first", tmp_path / copy)

    _run(1, config, tmp_path / "same", tmp_path / "same.log", 3)
    assert _draws(tmp_path / "same.log", 0) == {b: want[b] for b in range(2, 8)}  # bitwise

    _run(3, config, tmp_path / "a", tmp_path / "a.log", 1)
    _run(3, config, tmp_path / "b", tmp_path / "b.log", 1)
    a = [_draws(tmp_path / "a.log", r) for r in range(3)]
    assert a == [_draws(tmp_path / "b.log", r) for r in range(3)]  # the same in every such resume
    assert all(sorted(d) == list(range(2, 8)) for d in a)
    # rank 0 restored its own state: one python and one numpy number per batch, as in the reference
    assert {b: d[:2] for b, d in a[0].items()} == {b: want[b][:2] for b in range(2, 8)}
    for lib in range(3):  # python, numpy, torch: no number of a new rank is any other rank's
        drawn = [{d[lib] for d in a[r].values()} for r in range(3)]
        assert all(len(x) == 6 for x in drawn), lib
        assert not (drawn[1] & drawn[0]) and not (drawn[2] & drawn[0]) and not (drawn[1] & drawn[2]), lib


GAN = """\
models:
  vae:
    class: prep.testing.pipeline_data:sharp_vae
    options: {latent_channels: 2, down_block_types: [DownEncoderBlock2D, DownEncoderBlock2D],
              up_block_types: [UpDecoderBlock2D, UpDecoderBlock2D], block_out_channels: [8, 8],
              layers_per_block: 1, norm_num_groups: 4}
  discriminator: {class: "prep.pipeline.trainers:PatchDiscriminator", options: {channels: 4, layers: 2}}
trainer_options: {vae: {gan_weight: 0.5}}
datasets:
  d: {type: prep, path: DATA, fields: [jpg], decode: float, image_size: 16, seed: 3}
default_dataset: d
defaults: {workers: 0, seed: 1}
steps:
  - name: gan
    train_vae: true
    gan_training: true
    max_steps: STEPS
    grad_accumulation: ACC
    optimization:
      optimizers: {vae: {type: SGD, lr: 0.01}, discriminator: {type: SGD, lr: 0.01}}
"""


@pytest.mark.slow
@pytest.mark.parametrize("accumulation", [1, 2])
def test_gan_step_on_two_ranks_keeps_every_rank_equal_and_matches_one_rank(tmp_path, accumulation):
    """The reference VAE trainer with its patch-GAN, 4 optimizer steps under torchrun: both ranks end
    with the same VAE and discriminator weights (the VAE is trained through encode/decode, not forward:
    called beside its DDP wrapper, each rank trained on its own half of the batch), and those equal a
    1-rank run with the same global batch to float tolerance (the VAE's posterior draws no noise
    here: each rank draws its own, which would be other numbers than one rank's)."""
    make_shards(tmp_path / "data", [8, 8], image_size=16, distinct_images=16)
    config = tmp_path / "gan.yaml"
    text = GAN.replace("DATA", str(tmp_path / "data")).replace("ACC", str(accumulation))
    config.write_text(text.replace("STEPS", str(4 * accumulation)))
    _two_ranks_match_one(tmp_path, config, ("vae", "discriminator"))


FULL = """\
models:
  vae: {class: "diffusers:AutoencoderKL", pretrained: MODELS, subfolder: vae}
  text_encoder: {class: "transformers:TEXT", pretrained: MODELS, subfolder: text_encoder}
  flow_processor: {class: "prep.testing.pipeline_data:noise_echo", options: {channels: 4, width: 32}}
trainer_options:
  flow: {cfg_dropout: 0.0, timestep_scale: 1.0, max_length: 16, sample_images: 2, sample_steps: 1}
datasets:
  d: {type: prep, path: DATA, fields: [vae.npy, txt], seed: 3}
default_dataset: d
defaults: {workers: 0, seed: 1}
steps:
  - name: full
    train_diff_full: true
    freeze: [vae]
    max_steps: STEPS
    grad_accumulation: ACC
    optimization:
      optimizers: {flow_processor: {type: SGD, lr: 0.2}, text_encoder: {type: SGD, lr: 0.2}}
"""


@pytest.fixture(scope="module")
def zero_latents(tmp_path_factory):
    """Precached shards (20 samples, captions) whose `vae.npy` latents are all 0 (`latent_mode: mean` of
    a VAE whose posterior mean is 0), and the tiny models folder."""
    from prep.testing.pipeline_data import precached_shards, zero_latent_vae

    root = tmp_path_factory.mktemp("zero")
    zero_latent_vae(root / "models" / "vae")
    return precached_shards(root, latent_mode="mean"), root / "models"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("text_class", "accumulation"), [("CLIPTextModel", 1), ("CLIPTextModelWithProjection", 2)]
)
def test_text_encoder_trained_on_two_ranks_stays_equal_and_matches_one_rank(
    tmp_path, zero_latents, text_class, accumulation
):
    """`train_diff_full` (the flow trainer with an optimizer for its text encoder), 4 optimizer steps
    under torchrun: both ranks end with the same text-encoder weights, moved from the start, and those
    of a 1-rank run with the same global batch to float tolerance (the captions are encoded through the
    text encoder's DDP wrapper: called on the module itself, each rank trained its own copy on its own
    half of the batch). The denoiser echoes the noise of zero latents, so the loss does not depend on
    the noise and t each rank draws. A CLIP model with a projection its embeddings do not use
    (text_projection: no gradient) trains too, with gradient accumulation."""
    import torch

    shards, models = zero_latents
    config = tmp_path / "full.yaml"
    text = FULL.replace("DATA", str(shards)).replace("MODELS", str(models)).replace("TEXT", text_class)
    config.write_text(text.replace("ACC", str(accumulation)).replace("STEPS", str(4 * accumulation)))
    ranks, start = _two_ranks_match_one(tmp_path, config, ("text_encoder", "flow_processor"))
    for key in start["text_encoder"]:
        if key.startswith("text_projection"):  # nothing reaches it: left as built
            assert torch.equal(ranks[0]["text_encoder"][key], start["text_encoder"][key]), key


@pytest.mark.slow
def test_a_rerun_is_refused_while_the_workers_of_a_killed_torchrun_still_run(tmp_path):
    """SIGKILL to torchrun leaves its workers running (it starts them in sessions of their own): the
    same command run again must not train beside them in their folder (it would delete their temp
    files and prune their checkpoints). It is refused in one line naming the holder, touching nothing;
    once they end, the run goes on from where they left the folder, the uninterrupted stream."""
    from prep.pipeline import checkpoint as ckpt

    make_shards(tmp_path / "data", [9, 6, 8, 7, 5], image_size=8, distinct_images=1)
    config = tmp_path / "p.yaml"
    config.write_text(CONFIG.replace("DATA", str(tmp_path / "data")))
    _run(2, config, tmp_path / "ref", tmp_path / "ref.log", 2)
    want = _stream(tmp_path / "ref.log", 2)

    folder, log, gate = tmp_path / "run", tmp_path / "run.log", tmp_path / "gate"
    gate.touch()  # the workers wait inside their first batch until it goes
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "PREP_TEST_KEY_LOG": str(log),
           "PREP_TEST_GATE": str(gate)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "prep.cli", *pipeline_run_args(config, folder, "--set", "steps.0.batch_size=2")]
    launcher = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while not all(Path(f"{log}.rank{r}").exists() for r in range(2)):  # both ranks are training
            assert launcher.poll() is None, "the first run ended before training"
            time.sleep(0.05)
        launcher.kill()
        launcher.wait()
        before = sorted(p.name for p in folder.iterdir()) if folder.exists() else []
        del env["PREP_TEST_GATE"]
        again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
        assert again.returncode == 1
        lines = [ln for ln in again.stderr.splitlines() if ln.startswith("error:")]
        assert lines and all("another run is using the checkpoint folder (pid " in ln for ln in lines), \
            again.stderr[-3000:]
        assert (sorted(p.name for p in folder.iterdir()) if folder.exists() else []) == before
    finally:
        gate.unlink(missing_ok=True)  # the orphaned workers finish
    while True:  # their lock goes with them
        fd, _ = ckpt.hold(folder)
        if fd is not None:
            ckpt.release(fd)
            break
        time.sleep(0.1)
    _run(2, config, folder, tmp_path / "after.log", 2)
    assert _stream(log, 2) == want  # the orphans trained the whole run, alone


def _two_ranks_match_one(
    tmp_path: Path, config: Path, modules: tuple[str, ...]
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Train `config` on 1 rank (batch 4) and on 2 (batch 2 each: the same global batch); each of
    `modules` ends the same on both ranks, equal to the 1-rank run's to float tolerance, and moved from
    its start. Returns the ranks' saved modules and the start state dicts."""
    import torch

    from prep.pipeline import parse_pipeline_config
    from prep.pipeline.models import build_models

    entry = "prep.testing.pipeline_data:reference_build"
    _run(1, config, tmp_path / "one", tmp_path / "one", 4, entry=entry)
    _run(2, config, tmp_path / "two", tmp_path / "two", 2, entry=entry)
    one = torch.load(tmp_path / "one.rank0.pt")
    ranks = [torch.load(tmp_path / f"two.rank{r}.pt") for r in range(2)]
    start = {n: m.state_dict() for n, m in build_models(parse_pipeline_config(config)).items()}
    for module in modules:
        for key, value in one[module].items():
            assert torch.equal(ranks[0][module][key], ranks[1][module][key]), (module, key)
            assert torch.allclose(ranks[0][module][key], value, atol=1e-5, rtol=0), (module, key)
        moved = max((one[module][k] - start[module][k]).abs().max().item() for k in start[module])
        assert moved > 1e-3, module  # it trained
    return ranks, start
