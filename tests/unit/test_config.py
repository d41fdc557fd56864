"""Config loading, overrides and the errors a user sees."""
import json
from pathlib import Path

import pytest
import yaml

from mmray import config
from mmray.config import ConfigError

# Training configs; the sweep configs (a `sweep:` section) are checked by test_sweep_config.py.
CONFIGS = sorted(p for p in Path(__file__).resolve().parents[2].joinpath("jobs", "configs").glob("*.yaml")
                 if "sweep" not in (yaml.safe_load(p.read_text()) or {}))


def test_defaults_and_overrides_layer_in_order(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  lr: 0.01\n  max_steps: 300\nmodel:\n  preset: small\n  image_depth: 2\n")
    cfg = config.load(f, ["train.lr=3e-4", "train.zero_stage=3", "model.fusion=late"])
    assert cfg.train.lr == pytest.approx(3e-4)          # override beats file
    assert cfg.train.max_steps == 300                     # file beats default
    assert cfg.model.image_width == 256                   # from the 'small' preset
    assert cfg.model.image_depth == 2                     # file beats preset
    assert cfg.train.zero_stage == 3 and isinstance(cfg.train.zero_stage, int)


def test_round_trips_through_yaml(tmp_path):
    cfg = config.load(None, ["train.lr=0.005", "model.preset=small"])
    f = tmp_path / "resolved.yaml"
    f.write_text(cfg.to_yaml())
    assert config.load(f) == cfg
    assert config.load(f).run_name == cfg.run_name


def test_run_name_depends_on_what_is_trained_not_where():
    a = config.load(None, [])
    assert config.load(None, ["run.storage_path=/elsewhere", "train.log_every=5"]).run_name == a.run_name
    assert config.load(None, ["train.lr=0.1"]).run_name != a.run_name
    # Resources and evaluation are not what is trained: the same command on fewer workers resumes the run.
    assert config.load(None, ["train.num_workers=1", "train.cpus_per_worker=2", "eval.every=10"]).run_name == a.run_name
    assert config.load(None, ["run.name=mine"]).run_name == "mine"


@pytest.mark.parametrize("overrides, needles", [
    (["train.lrr=1"], ["unknown key train.lrr", "Did you mean 'train.lr'", "micro_batch_size"]),
    (["trian.lr=1"], ["unknown section 'trian'", "Did you mean 'train'"]),
    (["train.zero_stage=4"], ["train.zero_stage", "allowed values: 0, 1, 2, 3"]),
    (["model.preset=tinny"], ["model.preset", "'tinny'", "Did you mean 'tiny'"]),
    (["model.fusion=nope"], ["model.fusion", "allowed values: late"]),
    (["train.lr=fast"], ["train.lr", "expected float", "'fast'"]),
    (["train.num_workers=0"], ["train.num_workers", "minimum 1"]),
    (["train.num_workers=1.5"], ["train.num_workers", "expected int"]),
    (["train.use_gpu=maybe"], ["train.use_gpu", "'auto', 'true', 'false'"]),
    (["data.image_size=60"], ["data.image_size (60)", "multiple of model.patch_size (8)"]),
    (["model.image_heads=5"], ["model.image_width (128)", "divisible by model.image_heads (5)"]),
    (["train.warmup_steps=1000", "train.max_steps=10"], ["train.warmup_steps", "lower train.warmup_steps too"]),
    (["train.lr=nan"], ["train.lr", "expected a finite number, got nan"]),  # nan passes every min/max check
    (["train.grad_clip=inf"], ["train.grad_clip", "expected a finite number, got inf"]),
    (["train.max_steps=.inf"], ["train.max_steps", "expected int"]),
    (["lr=1"], ["must be section.key"]),
    (["train.lr"], ["must look like section.key=value"]),
    # evaluation after training would fail on no template; without '{}' every class gets one prompt
    (["eval.zero_shot_templates="], ["eval.zero_shot_templates", "holds no template"]),
    (["eval.zero_shot_templates=,"], ["eval.zero_shot_templates", "holds no template"]),
    (["eval.zero_shot_templates=a {},a shape"], ["'a shape' has no '{}' for the label"]),
    (["run.storage_path="], ["run.storage_path is empty"]),  # it would be the current directory
    (["data.cache_dir= "], ["data.cache_dir is empty"]),
])
def test_bad_input_names_the_key(overrides, needles):
    with pytest.raises(ConfigError) as e:
        config.load(None, overrides)
    for needle in needles:
        assert needle in str(e.value)


def test_webdataset_member_keys_are_parsed_and_defaults_match_the_reader():
    from mmray.data.pipeline import reader_options
    from mmray.data.reader import CAPTION_EXTENSION, IMAGE_EXTENSIONS, METADATA_EXTENSION

    assert config.webdataset_members(config.Config().data) == (IMAGE_EXTENSIONS, CAPTION_EXTENSION,
                                                               METADATA_EXTENSION)
    cfg = config.load(None, ["data.image_extensions= image.PNG , webp", "data.caption_extension=Caption",
                             "data.metadata_extension=meta.json"])
    assert reader_options(cfg) == {"image_column": "auto", "caption_column": "auto",
                                   "image_exts": ("image.png", "webp"), "caption_ext": "caption",
                                   "meta_ext": "meta.json", "rows_per_block": 256}


@pytest.mark.parametrize("overrides, needles", [
    (["data.image_extensions="], ["data.image_extensions", "cannot be empty"]),
    (["data.image_extensions=jpg,,png"], ["data.image_extensions", "cannot be empty"]),
    (["data.image_extensions=.jpg"], ["data.image_extensions", "without its leading dot: 'jpg'"]),
    (["data.image_extensions=jpg,png,jpg"], ["data.image_extensions", "twice"]),
    (["data.image_extensions=image..png"], ["data.image_extensions", "is not a member extension"]),
    (["data.caption_extension=txt."], ["data.caption_extension", "is not a member extension"]),
    (["data.caption_extension=a/txt"], ["data.caption_extension", "is not a member extension"]),
    (["data.caption_extension=''"], ["data.caption_extension", "cannot be empty"]),
    (["data.caption_extension=.txt"], ["data.caption_extension", "'txt', not '.txt'"]),
    (["data.caption_extension=PNG"], ["data.caption_extension: 'png' is also one of data.image_extensions"]),
    (["data.metadata_extension=txt"], ["data.metadata_extension: 'txt' is also data.caption_extension"]),
    (["data.metadata_extension=webp"], ["data.metadata_extension: 'webp' is also one of data.image_extensions"]),
    (["data.image_extensions=[jpg, png]"], ["data.image_extensions", "expected str", "comma-separated"]),
])
def test_bad_webdataset_member_keys_name_the_key(overrides, needles):
    with pytest.raises(ConfigError) as e:
        config.load(None, overrides)
    for needle in needles:
        assert needle in str(e.value)


def test_text_keys_take_the_text_as_typed():
    for name in ("007", "0x1F", "1:30", "yes", "exp #3", "2024-01-01"):  # YAML would read a number, bool, date, ...
        assert config.load(None, [f"run.name={name}"]).run.name == name
    assert config.load(None, ["run.name='quoted'"]).run.name == "quoted"  # quoted: YAML text, unquoted
    assert config.load(None, ["eval.zero_shot_templates=a photo: {}"]).eval.zero_shot_templates == "a photo: {}"
    assert config.load(None, ["train.lr=1e-3"]).train.lr == 0.001  # numbers still read as numbers


def test_use_gpu_accepts_yaml_booleans():
    assert config.load(None, ["train.use_gpu=true"]).train.use_gpu == "true"
    assert config.load(None, ["train.use_gpu=false"]).train.use_gpu == "false"
    # as YAML spells booleans, and 1 / 0 for a boolean key (YAML reads them as numbers)
    assert config.load(None, ["train.use_gpu=True"]).train.use_gpu == "true"
    for spelling, value in (("yes", "true"), ("On", "true"), ("1", "true"), ("no", "false"), ("0", "false")):
        assert config.load(None, [f"train.use_gpu={spelling}"]).train.use_gpu == value  # as in a YAML file
    assert config.load(None, ["train.activation_checkpointing=1"]).train.activation_checkpointing is True
    assert config.load(None, ["data.allow_missing_shards=On"]).data.allow_missing_shards is True
    assert config.load(None, ["data.allow_missing_shards=off"]).data.allow_missing_shards is False
    assert config.load(None, ["train.activation_checkpointing=0"]).train.activation_checkpointing is False
    with pytest.raises(ConfigError, match="train.activation_checkpointing: expected bool, got 2"):
        config.load(None, ["train.activation_checkpointing=2"])


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        config.load(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        config.load(bad)
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        config.load(bad)
    bad.write_text("train: {lr: 0.1}\nsweep: {metric: loss}\n")
    with pytest.raises(ConfigError, match=r"a sweep config \(its sweep: section\) is read by `mmray sweep --config"):
        config.load(bad)
    bad.write_text("train: 3\n")
    with pytest.raises(ConfigError, match="section 'train' must be a mapping"):
        config.load(bad)
    with pytest.raises(ConfigError, match="is a directory; give a YAML file"):
        config.load(tmp_path)
    bad.write_text("train:\n  lr: 0.1\ndata:\n  image_size: 32\ntrain:\n  max_steps: 60\n")  # YAML: the last wins
    with pytest.raises(ConfigError, match=r"bad.yaml is not valid YAML: 'train' is given twice \(first on line 1\)"):
        config.load(bad)
    bad.write_text("train:\n  lr: 0.1\n  lr: 0.5\n")
    with pytest.raises(ConfigError, match=r"'lr' is given twice \(first on line 2\)"):
        config.load(bad)
    bad.write_text("train:\n  ? [lr]\n  : 1\n")  # an unhashable key: YAML's own error, still bad input
    with pytest.raises(ConfigError, match="not valid YAML"):
        config.load(bad)
    # YAML merge keys are no duplicates: `<<: *defaults` then a key of one's own
    bad.write_text("base: &b {lr: 0.0003, warmup_steps: 5}\ntrain:\n  <<: *b\n  max_steps: 10\n")
    merged = config.parse_sections(bad.read_text(), bad)["train"]
    assert merged == {"lr": 0.0003, "warmup_steps": 5, "max_steps": 10}
    bad.write_bytes(b"\xff\xfetrain: {}\n")
    with pytest.raises(ConfigError, match="bad.yaml is not UTF-8 text"):
        config.load(bad)


def test_a_text_key_keeps_its_value_as_written_in_the_file(tmp_path):
    """YAML 1.1 reads `010` as the octal number 8, `12:30` as 750 and `2024-01-01` as a date: a run named so would
    have become run "8" (resuming another run's checkpoints) or been refused. Keys that hold numbers still read them
    as numbers, and `use_gpu: yes` is still true."""
    path = tmp_path / "c.yaml"
    path.write_text("run:\n  name: 010\n  storage_path: 2024-01-01\ndata:\n  source: 12:30\n  caption_extension: 1_0\n"
                    "train:\n  lr: 1.5e-3\n  max_steps: 1_000\n  use_gpu: yes\n  seed: 010\n")
    cfg = config.load(path)
    assert (cfg.run.name, cfg.run.storage_path, cfg.data.source) == ("010", "2024-01-01", "12:30")
    assert cfg.data.caption_extension == "1_0"
    assert (cfg.train.lr, cfg.train.max_steps, cfg.train.use_gpu, cfg.train.seed) == (0.0015, 1000, "true", 8)
    assert config.load(None, ["run.name=010"]).run.name == "010"  # as on the command line
    # through YAML's merge keys too (the section's own key wins, as YAML has it); a boolean is text for a text key
    # without choices (`run.name: yes`), and stays a boolean for one with (`use_gpu: yes`)
    path.write_text("<<: {run: {name: 010}}\ntrain:\n  <<: {use_gpu: on}\ndata:\n  <<: {source: 1:30}\n"
                    "  caption_extension: on\n")
    cfg = config.load(path)
    assert (cfg.run.name, cfg.train.use_gpu, cfg.data.source) == ("010", "true", "1:30")
    assert cfg.data.caption_extension == "on"
    path.write_text("run:\n  <<: {name: 010, storage_path: 2024-01-01}\n  name: yes\n")
    assert (config.load(path).run.name, config.load(path).run.storage_path) == ("yes", "2024-01-01")


def test_describe_documents_every_key():
    text = config.describe()
    for key in config.all_keys():
        section, name = key.split(".")
        assert f"  {name}: " in text
    assert "#" in text


def test_shipped_configs_exist():
    assert CONFIGS, "jobs/configs/ ships at least one example config"


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads(path):
    cfg = config.load(path)
    assert cfg.run_name


@pytest.mark.parametrize("name", ["../../etc", "/etc/x", "a//b", ".", "runs/..", "~me", "a\\..\\b", "grp/"])
def test_a_run_name_may_not_leave_the_storage_path(name, tmp_path):
    """Refused where a run directory is made (training); a config holding one still loads (the config.yaml of an
    export or checkpoint made before the rule)."""
    from mmray.train.trainer import train

    cfg = config.load(None, [f"run.name={name}", f"run.storage_path={tmp_path}"])
    with pytest.raises(config.ConfigError, match=r"run.name: .* may not be absolute or hold '.', '..'"):
        train(cfg)
    assert not any(tmp_path.iterdir())


def test_a_run_name_may_group_runs_in_folders():
    config.check_run_name("fusion/late-2")
    assert config.load(None, ["run.name=fusion/late-2"]).run_name == "fusion/late-2"


def test_a_run_named_by_an_earlier_mmray_is_continued(tmp_path):
    """The names earlier mmray versions derived for the default config, newest first: tiny-late-abe3b7d3 (before
    the name left out data.max_bad_fraction) and tiny-late-236e1579 (before it left out the worker count and
    eval.*). The same command finds such a run (its checkpoints and spend) instead of starting anew; the newest name
    that exists wins, and a run under the name derived now wins over them all."""
    from mmray.train.trainer import continue_legacy_run

    cfg = config.load(None, [])
    assert cfg.legacy_run_names() == ["tiny-late-abe3b7d3", "tiny-late-236e1579"]
    assert cfg.run_name not in cfg.legacy_run_names()
    assert continue_legacy_run(cfg, str(tmp_path)).run_name == cfg.run_name  # nothing there: the new name
    (tmp_path / "tiny-late-236e1579").mkdir()
    assert continue_legacy_run(cfg, str(tmp_path)).run_name == "tiny-late-236e1579"
    (tmp_path / "tiny-late-abe3b7d3").mkdir()
    assert continue_legacy_run(cfg, str(tmp_path)).run_name == "tiny-late-abe3b7d3"
    # A run started before with the default limit, stopped for its bad fraction: raising the limit finds it.
    raised = config.load(None, ["data.max_bad_fraction=0.2"])
    assert raised.run_name == cfg.run_name and "tiny-late-abe3b7d3" in raised.legacy_run_names()
    assert continue_legacy_run(raised, str(tmp_path)).run_name == "tiny-late-abe3b7d3"
    (tmp_path / cfg.run_name).mkdir()  # a run under the new name wins
    assert continue_legacy_run(cfg, str(tmp_path)).run_name == cfg.run_name
    named = config.load(None, ["run.name=mine"])
    assert named.legacy_run_names() == [] and continue_legacy_run(named, str(tmp_path)).run_name == "mine"


def test_the_bad_sample_limit_does_not_rename_the_run():
    """A run stopped for its bad fraction continues when data.max_bad_fraction is raised. What changes the samples
    or their ids (the data set, its seed, where synthetic data is cached: the ids hold the shard paths) names
    another run."""
    base = config.load(None, []).run_name
    assert config.load(None, ["data.max_bad_fraction=0.2"]).run_name == base
    assert config.load(None, ["data.synthetic_seed=1"]).run_name != base
    assert config.load(None, ["data.cache_dir=/elsewhere"]).run_name != base


def test_commands_refuse_what_would_be_misread(tmp_path, capsys):
    """In-process, as the console script runs them (exit 2, the message as the summary's error): a config override
    given to embed / generate where SRC or OUT goes (other commands take them there; read as a path, the real OUT
    became one more SRC), and a data set's DEST that is a file; `data inspect` takes data.allow_missing_shards, as
    its missing-shard error suggests."""
    from mmray import cli

    def last() -> dict:
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    for command in ("embed", "generate"):
        assert cli.main([command, str(tmp_path / "export"), str(tmp_path / "data"), str(tmp_path / "out"),
                         "data.caption_extension=txt"]) == cli.EXIT_BAD_INPUT
        assert last()["error"] == ("'data.caption_extension=txt' is given as SRC or OUT, but it is a config override: "
                                   "pass it as --set data.caption_extension=txt (the data reading keys, see --help)")
    assert not (tmp_path / "out").exists() and not Path("data.caption_extension=txt").exists()
    (tmp_path / "file").write_text("x")
    assert cli.main(["data", "prepare", "synthetic:shapes", str(tmp_path / "file"), "--samples", "20"]) == 2
    assert last()["error"] == f"DEST {tmp_path / 'file'} is a file; give a directory (or a new path) for the data set"
    assert cli.main(["data", "inspect", str(tmp_path / "{00000..00001}.tar"), "data.allow_missing_shards=true"]) == 2
    assert last()["error"].startswith("none of the 2 shard(s) named by")  # the override was taken: missing skipped


def test_a_command_taking_some_keys_names_the_nearest_for_a_typo():
    cfg = config.load(None)
    keys = ("data.caption_extension", "data.image_extensions")
    with pytest.raises(ConfigError, match=r"not: data.caption_extention=x\. Did you mean 'data.caption_extension'\?"):
        config.with_overrides(cfg, ["data.caption_extention=x"], keys, allowed="the data-reading keys")
    for other in ("train.lr=1", "data.image_size=32"):  # a real key, not taken here: no other key to suggest
        with pytest.raises(ConfigError, match=rf"not: {other}\.$"):
            config.with_overrides(cfg, [other], keys, allowed="the data-reading keys")
    assert config.with_overrides(cfg, ["data.caption_extension=caption"], keys).data.caption_extension == "caption"
