"""prep's DataLoader inside the loops people already have: a real Lightning `Trainer` (CPU) stopped
mid-epoch and resumed from Lightning's own checkpoint, and an accelerate loop resumed with
`load_state` (the loader registered with `register_for_checkpointing`, no `skip_first_batches`),
both continue on the exact next batch of the uninterrupted run (docs/pipeline.md, "Your own loop")."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch

from prep.loaders import DataLoader, ShardDataset
from prep.testing.loader_data import make_shards

EPOCHS = 3


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("own") / "d"
    make_shards(folder, [6, 6, 5], image_size=8)  # 17 samples: 6 batches of 3 per epoch, the last short
    return folder


def _loader(folder, workers: int = 0) -> DataLoader:
    return DataLoader(ShardDataset(folder, batch_size=3, decode="raw", seed=1), num_workers=workers)


# ------------------------------------------------------------------------------------------ Lightning
def _lightning(workers: int):
    L = pytest.importorskip("lightning")
    warnings.filterwarnings("ignore", module="lightning")
    logging.getLogger("lightning").setLevel(logging.ERROR)

    class Model(L.LightningModule):
        def __init__(self, seen: list[str]) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(1, 1)
            self.seen = seen

        def training_step(self, batch, batch_idx):
            self.seen.append(" ".join(batch["__key__"]))
            return self.lin(torch.ones(1, 1)).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    def trainer(**kw):
        return L.Trainer(accelerator="cpu", devices=1, max_epochs=EPOCHS, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, **kw)

    return L, Model, trainer


@pytest.mark.parametrize("workers", [0, 2])
def test_lightning_resumes_mid_epoch_on_the_exact_next_batch(data, tmp_path, workers):
    _, Model, trainer = _lightning(workers)
    from lightning.pytorch.callbacks import ModelCheckpoint

    full: list[str] = []
    trainer(enable_checkpointing=False).fit(Model(full), _loader(data, workers))
    assert len(full) == EPOCHS * 6 and len(set(full[:6])) == 6 and full[:6] != full[6:12]
    stopped: list[str] = []
    every = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=4, save_top_k=-1)
    trainer(max_steps=11, callbacks=[every]).fit(Model(stopped), _loader(data, workers))
    assert stopped == full[:11]
    ckpts = sorted(tmp_path.glob("*.ckpt"), key=lambda p: int(p.stem.split("step=")[1]))
    assert [int(p.stem.split("step=")[1]) for p in ckpts] == [4, 8]  # mid-epoch 0 and mid-epoch 1
    for ckpt in ckpts:
        n = int(ckpt.stem.split("step=")[1])
        rest: list[str] = []
        trainer(enable_checkpointing=False).fit(Model(rest), _loader(data, workers), ckpt_path=str(ckpt))
        assert rest == full[n:], (n, rest[:2], full[n : n + 2])


def test_lightning_resumes_from_last_ckpt_as_the_docs_configure_it(data, tmp_path):
    """docs/pipeline.md's callback (dirpath, every_n_train_steps, save_last=True) leaves
    `checkpoints/last.ckpt`, and `ckpt_path` on it continues on the exact next batch."""
    _, Model, trainer = _lightning(0)
    from lightning.pytorch.callbacks import ModelCheckpoint

    full: list[str] = []
    trainer(enable_checkpointing=False).fit(Model(full), _loader(data))
    stopped: list[str] = []
    every = ModelCheckpoint(dirpath=tmp_path / "checkpoints", every_n_train_steps=4, save_last=True)
    trainer(max_steps=11, callbacks=[every]).fit(Model(stopped), _loader(data))  # stopped mid-epoch 1
    rest: list[str] = []
    trainer(enable_checkpointing=False).fit(Model(rest), _loader(data),
                                        ckpt_path=str(tmp_path / "checkpoints" / "last.ckpt"))
    assert rest == full[8:]  # the last checkpoint was written after batch 8


# ----------------------------------------------------------------------------------------- accelerate
def _accelerate_run(folder, out, seen: list[str], *, stop_at: int | None, resume: bool) -> None:
    """The loop of docs/pipeline.md: the loader is registered (not prepared), its state saved and
    loaded with the model's; the epoch counter travels in a small registered object."""
    from accelerate import Accelerator

    class Progress:
        def __init__(self) -> None:
            self.epoch = 0

        def state_dict(self) -> dict[str, int]:
            return {"epoch": self.epoch}

        def load_state_dict(self, state: dict[str, int]) -> None:
            self.epoch = state["epoch"]

    acc = Accelerator(cpu=True)
    model = torch.nn.Linear(1, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model, opt = acc.prepare(model, opt)
    loader, progress = _loader(folder), Progress()
    acc.register_for_checkpointing(loader, progress)
    if resume:
        acc.load_state(str(out))
    step = 0
    while progress.epoch < EPOCHS:
        loader.set_epoch(progress.epoch)  # a restored mid-epoch position stays where it was
        for batch in loader:
            seen.append(" ".join(batch["__key__"]))
            loss = model(torch.ones(1, 1)).sum()
            acc.backward(loss)
            opt.step()
            opt.zero_grad()
            step += 1
            if step == stop_at:
                acc.save_state(str(out))
                return
        progress.epoch += 1


def test_accelerate_resumes_mid_epoch_on_the_exact_next_batch(data, tmp_path):
    pytest.importorskip("accelerate")
    full: list[str] = []
    _accelerate_run(data, tmp_path / "none", full, stop_at=None, resume=False)
    assert len(full) == EPOCHS * 6
    for stop in (4, 6, 9):  # mid-epoch 0, exactly at an epoch's end, mid-epoch 1
        first: list[str] = []
        _accelerate_run(data, tmp_path / f"s{stop}", first, stop_at=stop, resume=False)
        rest: list[str] = []
        _accelerate_run(data, tmp_path / f"s{stop}", rest, stop_at=None, resume=True)
        assert first + rest == full, stop
