"""The stage config: errors that name file, line and key; `${...}` interpolation; `--set`; YAML 1.2
scalars (the YAML 1.1 traps); the shipped template loads and chains folders as NeMo's does."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel, ConfigDict, ValidationError

from prep.config import _validation_errors, load_config, parse_scalar, parse_yaml
from prep.errors import PrepError, PrepErrorGroup

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def errors_of(path: Path | None, overrides: list[str] | None = None) -> list[PrepError]:
    with pytest.raises(PrepError) as info:
        load_config(path, overrides)
    return getattr(info.value, "errors", [info.value])


def test_template_loads_and_chains_folders(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DATA_DIR", str(tmp_path))
    cfg = load_config(REPO / "configs" / "download_multimodal.yaml")
    root = tmp_path / "laion-art"
    assert cfg.dataset_output_root == root
    assert cfg.download_images.input_dir == cfg.download_parquet.output_dir == root / "parquet"
    assert cfg.reorganize_tar.input_dir == cfg.download_images.output_dir
    assert cfg.generate_wdinfo.input_dir == [cfg.precache_encodings.output_dir]
    assert cfg.generate_wdinfo.tar_chunk_size == cfg.reorganize_tar.tar_chunk_size
    assert cfg.generate_wdinfo.output_wdinfo_path == root / "wdinfo.pkl"


def test_template_comments_every_field_of_every_stage() -> None:
    from prep.stages import STAGE_ORDER, get_stage

    text = (REPO / "configs" / "download_multimodal.yaml").read_text()
    for stage in STAGE_ORDER:
        config = get_stage(stage).Config
        section = text.split(f"\n{stage}:", 1)[1].split("\n\n", 1)[0]
        commented = {line.split(":", 1)[0].strip().lstrip("# ") for line in section.splitlines()
                     if "#" in line.split(":", 1)[-1]}  # `key: value  # what it is`, or a commented-out key
        assert set(config.model_fields) <= commented, stage
        assert all(f.description for f in config.model_fields.values())


def _leaves(node: object, key: tuple[str, ...] = ()):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _leaves(v, (*key, str(k)))
    else:
        yield key, node


def _at(doc: object, key: tuple[str, ...]) -> object:
    for part in key:
        doc = doc[part]  # type: ignore[index]
    return doc


def test_template_values_are_the_code_defaults_unless_marked_override(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("DATA_DIR", str(tmp_path))
    path = REPO / "configs" / "download_multimodal.yaml"
    text = path.read_text()
    raw, lines = parse_yaml(text, str(path))
    template = load_config(path).model_dump(mode="json")
    root = template["dataset_output_root"]
    defaults = load_config(None, [f"dataset_output_root={root}"]).model_dump(mode="json")
    source = text.splitlines()
    checked = 0
    for key, _ in _leaves(raw):
        marked = "# [override]" in source[lines[key] - 1]
        # the root is handed to the defaults too, so that folders compare; its own default is none
        same = key != ("dataset_output_root",) and _at(template, key) == _at(defaults, key)
        ours, theirs = _at(template, key), _at(defaults, key)
        assert same != marked, (f"{'.'.join(key)} (line {lines[key]}): "
                                + ("marked [override] but equals the code default" if marked else
                                   f"{ours!r} differs from the code default {theirs!r};"
                                   " change one or mark the line '# [override] why'"))
        checked += 1
    assert checked > 100


def test_defaults_without_a_file() -> None:
    cfg = load_config(None, ["dataset_output_root=/data/x"])
    assert cfg.reorganize_tar.output_dir == Path("/data/x/tarfiles_reorganized")


def test_unknown_key_names_key_path_file_and_line(tmp_path: Path) -> None:
    path = write(
        tmp_path, "dataset_output_root: /d\ngenerate_wdinfo:\n  recursive: true\n  recursiv: false\n"
    )
    (err,) = errors_of(path)
    assert err.where == f"{path}:4"
    assert "unknown key generate_wdinfo.recursiv" in err.what
    assert err.fix and "\n" not in err.line()


def test_wrong_type_and_null_value_name_key_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, "generate_wdinfo:\n  tar_chunk_size: lots\n  recursive:\n  write_nv_meta: yes\n")
    errs = errors_of(path)
    by_key = {e.what.split(":", 1)[0]: e for e in errs}
    assert by_key["generate_wdinfo.tar_chunk_size"].where == f"{path}:2"
    assert "'lots'" in by_key["generate_wdinfo.tar_chunk_size"].what
    assert by_key["generate_wdinfo.recursive"].where == f"{path}:3"
    assert "None" in by_key["generate_wdinfo.recursive"].what
    assert len(errs) == 2, "every problem is reported at once; `yes` is a valid bool string for pydantic"


def test_true_false_is_not_a_number_and_a_number_is_not_true_false(tmp_path: Path) -> None:
    """pydantic's lax mode would read `true` as 1 (shards of one sample) and `1` as true; both are
    refused, naming the key and line, in the file and in --set."""
    path = write(tmp_path, "reorganize_tar:\n  tar_chunk_size: true\n  strict: 1\n")
    by_key = {e.what.split(":", 1)[0]: e for e in errors_of(path)}
    assert set(by_key) == {"reorganize_tar.tar_chunk_size", "reorganize_tar.strict"}
    assert "expected a number, not true/false" in by_key["reorganize_tar.tar_chunk_size"].what
    assert by_key["reorganize_tar.tar_chunk_size"].where == f"{path}:2"
    assert "expected true or false, not a number" in by_key["reorganize_tar.strict"].what
    assert by_key["reorganize_tar.strict"].where == f"{path}:3"
    sets = ["reorganize_tar.input_dir=/a", "reorganize_tar.tar_chunk_size=false",
            "reorganize_tar.strict=true"]
    (err,) = errors_of(None, sets)
    assert "expected a number" in err.what and err.where == "--set reorganize_tar.tar_chunk_size"


def test_missing_required_key_is_named() -> None:
    class Stage(BaseModel):
        model_config = ConfigDict(extra="forbid")
        url_col: str

    class Root(BaseModel):
        stage: Stage

    data, lines = parse_yaml("stage:\n  other: 1\n", "f.yaml")
    with pytest.raises(ValidationError) as info:
        Root.model_validate(data)
    group = _validation_errors(info.value, "f.yaml", lines)
    assert isinstance(group, PrepErrorGroup)
    whats = {e.what: e.where for e in group.errors}
    assert whats == {
        "required key stage.url_col is missing": "f.yaml:1",
        "unknown key stage.other": "f.yaml:2",
    }


def test_yaml_errors_and_bad_files(tmp_path: Path) -> None:
    (err,) = errors_of(write(tmp_path, "a: [1, 2\nb: 3\n"))
    assert err.where.startswith(str(tmp_path / "cfg.yaml") + ":") and "invalid YAML" in err.what
    (err,) = errors_of(write(tmp_path, "- just\n- a list\n"))
    assert "mapping" in err.what
    (err,) = errors_of(tmp_path / "missing.yaml")
    assert "not found" in err.what and err.where == str(tmp_path / "missing.yaml")


def test_an_alias_bomb_is_refused_at_once(tmp_path: Path) -> None:
    """Aliases of aliases (9 to the 8th values here) are refused while parsing, not expanded."""
    lines = ['a0: &a0 ["x","x","x","x","x","x","x","x","x"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 8)]
    (err,) = errors_of(write(tmp_path, "\n".join(lines) + "\n"))
    assert "expands to more than 100,000 values" in err.what and err.where == str(tmp_path / "cfg.yaml")
    small = write(tmp_path, "base: &b {x: 1}\nstages: [*b, *b]\n")  # aliases themselves are fine
    assert all("expands" not in e.what for e in errors_of(small))


def test_yaml_1_1_traps() -> None:
    data, _ = parse_yaml(
        "resize_mode: no\na: yes\nb: on\nc: off\nd: true\ne: 1e-4\nf: 010\ng: 1:30\n"
        "h: 2024-01-01\ni: False\nj: 0x10\nk: ~\n",
        "t.yaml",
    )
    assert data == {
        "resize_mode": "no",
        "a": "yes",
        "b": "on",
        "c": "off",
        "d": True,
        "e": 1e-4,
        "f": 10,
        "g": "1:30",
        "h": "2024-01-01",
        "i": False,
        "j": 16,
        "k": None,
    }


def test_set_values_are_typed_as_yaml() -> None:
    assert [parse_scalar(v) for v in ["no", "5", "true", "[jpg, txt]", "", "1e3", "a=b", "null"]] == [
        "no",
        5,
        True,
        ["jpg", "txt"],
        "",
        1000.0,
        "a=b",
        None,
    ]
    cfg = load_config(
        None,
        [
            "generate_wdinfo.tar_chunk_size=500",
            "generate_wdinfo.file_ext_in_tar=[.jpg, txt]",
            "generate_wdinfo.recursive=false",
            "generate_wdinfo.input_dir=/a/b",
        ],
    )
    g = cfg.generate_wdinfo
    assert (g.tar_chunk_size, g.file_ext_in_tar, g.recursive, g.input_dir) == (
        500,
        ["jpg", "txt"],
        False,
        [Path("/a/b")],
    )


def test_set_overrides_file_and_errors_point_at_set(tmp_path: Path) -> None:
    path = write(tmp_path, "generate_wdinfo:\n  tar_chunk_size: 7\n")
    assert load_config(path, ["generate_wdinfo.tar_chunk_size=9"]).generate_wdinfo.tar_chunk_size == 9
    (err,) = errors_of(path, ["generate_wdinfo.tar_chunk_size=zero"])
    assert err.where == "--set generate_wdinfo.tar_chunk_size"
    assert "generate_wdinfo.tar_chunk_size" in err.what
    (err,) = errors_of(path, ["generate_wdinfo.nope=1"])
    assert "unknown key generate_wdinfo.nope" in err.what
    deeper = "generate_wdinfo.tar_chunk_size.deeper"
    for bad, where in [("novalue", "--set"), ("=3", "--set"), (f"{deeper}=1", f"--set {deeper}")]:
        (err,) = errors_of(path, [bad])
        assert err.where == where


def test_interpolation_forms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PREP_T_ROOT", "/env/root")
    monkeypatch.delenv("PREP_T_UNSET", raising=False)
    path = write(
        tmp_path,
        "\n".join(
            [
                "dataset_output_root: ${PREP_T_ROOT}/data",  # env through ${VAR}
                "dataset_repo_id: ${env:PREP_T_UNSET,laion/default}",  # env default
                "reorganize_tar:",
                "  tar_chunk_size: 250",
                "  output_dir: ${dataset_output_root}/reorg",  # config key, absolute
                "generate_wdinfo:",
                "  tar_chunk_size: ${..reorganize_tar.tar_chunk_size}",  # NeMo's relative form, typed
                # inside a list one more dot climbs out of the list
                "  input_dir: ['${...reorganize_tar.output_dir}', '${oc.env:PREP_T_ROOT}/x']",
                "  output_wdinfo_path: ${.input_dir.0}/wd.pkl",  # sibling, list index
                "",
            ]
        ),
    )
    cfg = load_config(path)
    assert cfg.dataset_output_root == Path("/env/root/data")
    assert cfg.dataset_repo_id == "laion/default"
    g = cfg.generate_wdinfo
    assert g.tar_chunk_size == 250
    assert g.input_dir == [Path("/env/root/data/reorg"), Path("/env/root/x")]
    assert g.output_wdinfo_path == Path("/env/root/data/reorg/wd.pkl")


@pytest.mark.parametrize(
    ("text", "message", "line"),
    [
        ("a: 1\ngenerate_wdinfo:\n  tar_chunk_size: ${nope.key}\n", "neither a config key", 3),
        ("generate_wdinfo:\n  input_dir: ${env:PREP_T_UNSET}\n", "PREP_T_UNSET is not set", 2),
        ("x: ${y}\ny: ${x}\n", "cycle", 1),
        ("x: ${x}\n", "cycle", 1),
        ("generate_wdinfo:\n  recursive: ${....too.far}\n", "neither a config key", 2),
    ],
)
def test_interpolation_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str, message: str, line: int
) -> None:
    monkeypatch.delenv("PREP_T_UNSET", raising=False)
    path = write(tmp_path, text)
    (err,) = errors_of(path)
    assert message in err.what and err.where == f"{path}:{line}"


def test_secret_values_are_not_echoed_in_errors() -> None:
    class Stage(BaseModel):
        hf_token: int

    data, lines = parse_yaml("stage:\n  hf_token: hf_SECRETVALUE\n", "f.yaml")
    with pytest.raises(ValidationError) as info:
        type("Root", (BaseModel,), {"__annotations__": {"stage": Stage}}).model_validate(data)
    (err,) = _validation_errors(info.value, "f.yaml", lines).errors
    assert "hf_SECRETVALUE" not in err.line() and "stage.hf_token" in err.what and err.where == "f.yaml:2"


def test_duplicate_keys_are_errors_but_merge_keys_work(tmp_path: Path) -> None:
    (err,) = errors_of(
        write(tmp_path, "generate_wdinfo:\n  strict: true\n  recursive: false\n  strict: false\n")
    )
    assert err.where.endswith(":4:3")  # line and column
    assert "generate_wdinfo.strict is given twice (first at line 2)" in err.what
    text = "base: &b\n  strict: true\n  recursive: false\n"
    data, _ = parse_yaml(text + "generate_wdinfo:\n  <<: *b\n  recursive: true\n", "t.yaml")
    assert data["generate_wdinfo"] == {"strict": True, "recursive": True}


def test_unset_inputs_follow_the_last_enabled_stage_that_writes_shards() -> None:
    root = Path("/data/x")
    off = lambda *stages: [f"{s}.enable=false" for s in stages]  # noqa: E731
    cfg = load_config(None, [f"dataset_output_root={root}"])
    assert cfg.reorganize_tar.input_dir == root / "tarfiles_raw" and not cfg.merge_source_tar.enable
    assert cfg.generate_wdinfo.input_dir == [root / "tarfiles_precached"]
    assert cfg.generate_wdinfo.tar_chunk_size == cfg.reorganize_tar.tar_chunk_size
    cfg = load_config(None, [f"dataset_output_root={root}", *off("precache_encodings")])
    assert cfg.generate_wdinfo.input_dir == [root / "tarfiles_reorganized"]
    assert not cfg.merge_source_tar.enable
    cfg = load_config(None, [f"dataset_output_root={root}", "ingest_local.enable=true",
                             *off("download_parquet", "download_images")])
    assert cfg.reorganize_tar.input_dir == root / "tarfiles_ingested"
    cfg = load_config(None, [f"dataset_output_root={root}", "precache_encodings.keep_source=false"])
    assert cfg.merge_source_tar.enable and cfg.merge_source_tar.source_dir == root / "tarfiles_reorganized"
    assert cfg.generate_wdinfo.input_dir == [root / "tarfiles_precached"]  # merged in place
    cfg = load_config(None, [f"dataset_output_root={root}", "precache_encodings.keep_source=false",
                             f"merge_source_tar.output_dir={root / 'm'}",
                             f"precache_encodings.input_dir={root / 'p'}"])
    assert cfg.generate_wdinfo.input_dir == [root / "m"]
    assert cfg.merge_source_tar.source_dir == root / "p"  # the shards precache read
    cfg = load_config(None, [f"dataset_output_root={root}", "precache_encodings.keep_source=false",
                             "merge_source_tar.enable=false"])
    assert not cfg.merge_source_tar.enable and cfg.generate_wdinfo.input_dir == [root / "tarfiles_precached"]
    cfg = load_config(None, [f"dataset_output_root={root}", *off("reorganize_tar", "precache_encodings")])
    assert cfg.generate_wdinfo.input_dir == [root / "tarfiles_raw"]
    assert cfg.generate_wdinfo.tar_chunk_size is None
    cfg = load_config(None, [f"dataset_output_root={root}", f"reorganize_tar.input_dir={root / 'mine'}",
                             *off("download_images", "precache_encodings")])
    assert cfg.reorganize_tar.input_dir == root / "mine"  # a folder that is set stays set
    cfg = load_config(None, [f"generate_wdinfo.input_dir={root / 'g'}"])
    assert cfg.generate_wdinfo.tar_chunk_size is None  # not reorganize_tar's output: the most common count


def test_references_may_name_computed_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, "dataset_output_root: /d\n"
                 "generate_wdinfo:\n  input_dir: ${..reorganize_tar.output_dir}\n"
                 "  tar_chunk_size: ${..reorganize_tar.tar_chunk_size}\n"
                 "reorganize_tar:\n  input_dir: ${ingest_local.output_dir}/part\n  tar_chunk_size: 7\n"
                 "precache_encodings:\n  output_dir: ${..reorganize_tar.input_dir}-encoded\n")
    cfg = load_config(path)
    assert cfg.generate_wdinfo.input_dir == [Path("/d/tarfiles_reorganized")]
    assert cfg.generate_wdinfo.tar_chunk_size == 7
    assert cfg.reorganize_tar.input_dir == Path("/d/tarfiles_ingested/part")
    assert cfg.precache_encodings.output_dir == Path("/d/tarfiles_ingested/part-encoded")
    (err,) = errors_of(write(tmp_path, "generate_wdinfo:\n  input_dir: ${..reorganize_tar.nothing}\n"))
    assert "${..reorganize_tar.nothing} is neither a config key" in err.what and err.where == f"{path}:2"
    (err,) = errors_of(write(tmp_path, "generate_wdinfo:\n  input_dir: ${dataset_output_root}/x\n"))
    assert "${dataset_output_root} is neither a config key" in err.what  # unset, and no default either


def test_root_model_has_one_section_per_stage_in_order():
    from prep.config import PrepConfig
    from prep.stages import STAGE_ORDER

    sections = [k for k in PrepConfig.model_fields if not k.startswith("dataset_")]
    assert tuple(sections) == STAGE_ORDER
