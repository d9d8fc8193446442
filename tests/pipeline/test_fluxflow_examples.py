"""FluxFlow's own example configs (its multi-dataset guide, copied unchanged) parse, select datasets
by its rules, and plan; and a token never shows in a plan, its JSON, a repr, or any error."""

import json

import pytest
import yaml
from rich.console import Console

from prep.errors import PrepError, PrepErrorGroup
from prep.pipeline import parse_pipeline_config
from prep.pipeline.plan import make_plan, render_plan
from prep.testing.loader_data import make_shards
from prep.testing.servers import serve_files

PROGRESSIVE = """\
datasets:
  lowres_dataset:
    type: local
    image_folder: /data/256x256
    captions_file: /data/captions_lowres.txt
    batch_size: 8

  highres_dataset:
    type: local
    image_folder: /data/1024x1024
    captions_file: /data/captions_highres.txt
    batch_size: 2

steps:
  - name: vae_lowres
    dataset: lowres_dataset
    train_vae: true
    n_epochs: 10

  - name: vae_highres
    dataset: highres_dataset
    train_vae: true
    n_epochs: 5
"""

DOMAIN = """\
datasets:
  faces_dataset:
    type: local
    image_folder: /data/faces
    captions_file: /data/captions_faces.txt

  landscapes_dataset:
    type: local
    image_folder: /data/landscapes
    captions_file: /data/captions_landscapes.txt

steps:
  - name: vae_faces
    dataset: faces_dataset
    train_vae: true
    n_epochs: 10

  - name: flow_combined
    dataset: landscapes_dataset
    train_diff: true
    n_epochs: 20
    freeze: [compressor, expander]
"""

LOCAL_REMOTE = """\
datasets:
  local_curated:
    type: local
    image_folder: /data/curated
    captions_file: /data/curated.txt
    batch_size: 2

  remote_large:
    type: webdataset
    webdataset_url: "https://huggingface.co/datasets/my-dataset/data-{000..999}.tar"
    webdataset_token: ${HF_TOKEN}
    webdataset_size: 1000000
    batch_size: 8

steps:
  - name: pretrain_remote
    dataset: remote_large
    train_vae: true
    n_epochs: 50

  - name: finetune_local
    dataset: local_curated
    train_vae: true
    n_epochs: 10
"""

SECRET = "hf_ThisMustNeverBePrinted42"


@pytest.mark.parametrize(
    "text", [PROGRESSIVE, DOMAIN, LOCAL_REMOTE], ids=["progressive", "domain", "local+remote"]
)
def test_fluxflow_examples_parse_unchanged(tmp_path, monkeypatch, text):
    monkeypatch.setenv("HF_TOKEN", SECRET)
    path = tmp_path / "fluxflow.yaml"
    path.write_text(text)
    cfg = parse_pipeline_config(path)
    assert [cfg.step_dataset(i) for i in range(len(cfg.steps))] == [s.dataset for s in cfg.steps]
    assert all(s.trainers for s in cfg.steps)
    plans = make_plan(cfg, build=False)
    assert [p.length.epochs for p in plans] == [float(s.n_epochs) for s in cfg.steps]
    assert SECRET not in json.dumps([p.to_json() for p in plans]) and SECRET not in repr(cfg)
    if text is LOCAL_REMOTE:  # not opened: the plan counts webdataset_size, 1,000,000 at batch 8
        assert (plans[0].samples_per_epoch, plans[0].batches_per_epoch) == (1_000_000, 125_000)
        assert plans[0].length.batches == 50 * 125_000


def test_domain_example_as_a_dict_freezes_and_selects_flow():
    cfg = parse_pipeline_config(yaml.safe_load(DOMAIN))
    step = cfg.steps[1]
    assert step.trainers == ["flow"] and step.freeze == ["compressor", "expander"]


def test_token_never_in_plan_json_or_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("WEB_TOKEN", SECRET)
    make_shards(tmp_path / "srv" / "web", [4, 3], image_size=8, distinct_images=1)
    with serve_files(tmp_path / "srv", token=SECRET) as srv:
        text = (
            "training:\n  pipeline:\n    datasets:\n      web:\n        type: webdataset\n"
            f"        webdataset_url: '{srv.url}/web/shard-{{00000..00001}}.tar'\n"
            "        webdataset_token: ${WEB_TOKEN}\n        webdataset_image_key: jpg\n"
            "        webdataset_caption_key: txt\n"
            "    steps:\n      - {name: s, dataset: web, n_epochs: 1}\n"
        )
        path = tmp_path / "p.yaml"
        path.write_text(text)
        cfg = parse_pipeline_config(path)
        plans = make_plan(cfg)
        assert not plans[0].problems and plans[0].samples_per_epoch == 7
        console = Console(record=True, width=200)
        render_plan(plans, console)
        shown = (
            console.export_text()
            + json.dumps([p.to_json() for p in plans])
            + json.dumps(plans[0].fingerprint_doc)
            + repr(cfg)
            + str(cfg.model_dump())
            + cfg.model_dump_json()
        )
        assert SECRET not in shown
        # a wrong token: the server's 401 becomes an error that names the URL, never the token
        monkeypatch.setenv("WEB_TOKEN", SECRET + "x")
        plans = make_plan(parse_pipeline_config(path))
        line = plans[0].problems[0].line()
        assert "401" in line and SECRET not in line
    # a config error on the token's own key does not echo the value
    bad = text.replace("webdataset_token: ${WEB_TOKEN}", f"webdataset_token: [{SECRET}]")
    path.write_text(bad)
    with pytest.raises(PrepErrorGroup) as err:
        parse_pipeline_config(path)
    assert "webdataset_token" in str(err.value.errors[0]) and SECRET not in str(err.value.errors)
    # nor does an interpolation error, nor an unknown key carrying it
    path.write_text(text.replace("webdataset_token:", "webdataset_tokn:"))
    with pytest.raises(PrepError) as err2:
        parse_pipeline_config(path)
    assert "did you mean webdataset_token" in str(err2.value) and SECRET not in str(err2.value.errors)
