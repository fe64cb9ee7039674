"""Bad inputs stop the converter with one clear sentence, and nothing already saved is lost."""

from __future__ import annotations

import json
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

from eu_jax.convert.checkpoint import load_model_meta
from eu_jax.convert.cli import build_parser
from eu_jax.convert.cli import main as eu_convert
from eu_jax.convert.hf_import import import_checkpoint
from eu_jax.convert.safetensors_io import WeightFormatError
from eu_jax.files import load_python_file
from eu_jax.models.config import UnsupportedModelError, from_hf_config
from tests.tiny_models import save_hf_model


@pytest.fixture()
def hf_dir(tmp_path):
    save_hf_model("llama", tmp_path / "hf")
    return tmp_path / "hf"


def rewrite_weights(hf_dir, edit):
    path = hf_dir / "model.safetensors"
    tensors = safetensors.numpy.load_file(path)
    edit(tensors)
    safetensors.numpy.save_file(tensors, path, metadata={"format": "pt"})


def edit_config(hf_dir, **changes):
    config = json.loads((hf_dir / "config.json").read_text())
    config.update(changes)
    (hf_dir / "config.json").write_text(json.dumps(config))


def test_missing_tensor(hf_dir, tmp_path):
    rewrite_weights(hf_dir, lambda t: t.pop("model.layers.1.mlp.down_proj.weight"))
    with pytest.raises(ValueError, match=r"missing tensor model\.layers\.1\.mlp\.down_proj\.weight"):
        import_checkpoint(hf_dir, tmp_path / "ckpt", progress=False)


def test_tensor_of_the_wrong_shape(hf_dir, tmp_path):
    rewrite_weights(hf_dir, lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": np.zeros((64, 64), np.float32)}))
    with pytest.raises(ValueError, match=r"k_proj\.weight in model\.safetensors has shape \(64, 64\), but .* needs \(32, 64\)"):
        import_checkpoint(hf_dir, tmp_path / "ckpt", progress=False)


def test_unexpected_tensor(hf_dir, tmp_path):
    rewrite_weights(hf_dir, lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": np.zeros(64, np.float32)}))
    with pytest.raises(ValueError, match=r"unexpected tensor model\.layers\.0\.self_attn\.q_proj\.bias"):
        import_checkpoint(hf_dir, tmp_path / "ckpt", progress=False)


@pytest.mark.parametrize("model_type", ["gpt2", "not_a_model"])
def test_unknown_architecture(hf_dir, tmp_path, model_type):
    edit_config(hf_dir, model_type=model_type)
    with pytest.raises(UnsupportedModelError, match=f"model_type '{model_type}'"):
        import_checkpoint(hf_dir, tmp_path / "ckpt", progress=False)


def test_unsupported_config_feature(hf_dir, tmp_path):
    edit_config(hf_dir, rope_scaling={"rope_type": "yarn", "factor": 4.0}, rope_parameters=None)
    with pytest.raises(UnsupportedModelError, match="RoPE scaling type 'yarn' is not supported"):
        import_checkpoint(hf_dir, tmp_path / "ckpt", progress=False)


def test_truncated_safetensors(hf_dir, tmp_path):
    path = hf_dir / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(WeightFormatError, match="model.safetensors is truncated"):
        import_checkpoint(hf_dir, tmp_path / "ckpt", progress=False)


def test_integer_weight_refused(hf_dir, tmp_path):
    path = hf_dir / "model.safetensors"
    tensors = safetensors.numpy.load_file(path)
    name = "model.layers.0.mlp.down_proj.weight"
    tensors[name] = tensors[name].astype(np.int8)
    safetensors.numpy.save_file(tensors, path)
    with pytest.raises(ValueError, match=f"tensor {name} in model.safetensors is int8, but weights must be floating"):
        import_checkpoint(hf_dir, tmp_path / "ckpt", progress=False)
    assert not (tmp_path / "ckpt").exists()


def to_pickle(hf_dir):
    """The directory's weights as a pytorch_model.bin pickle instead of safetensors."""
    state = {k: torch.from_numpy(v) for k, v in safetensors.numpy.load_file(hf_dir / "model.safetensors").items()}
    torch.save(state, hf_dir / "pytorch_model.bin")
    (hf_dir / "model.safetensors").unlink()


def test_pickle_refused_without_opt_in_and_loaded_with_it(hf_dir, tmp_path):
    to_pickle(hf_dir)
    with pytest.raises(WeightFormatError, match="pickle.*--allow-pickle"):
        import_checkpoint(hf_dir, tmp_path / "refused", progress=False)
    assert not (tmp_path / "refused" / "params").exists()
    import_checkpoint(hf_dir, tmp_path / "ckpt", allow_pickle=True, progress=False)
    assert (tmp_path / "ckpt" / "params").is_dir()


def test_existing_output_is_never_overwritten(hf_dir, tmp_path):
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="is a folder that is not empty"):
        import_checkpoint(hf_dir, out, progress=False)
    assert (out / "precious.txt").read_text() == "keep me"


def test_cli_reports_one_line_and_exit_code_2(hf_dir, tmp_path, capsys):
    rewrite_weights(hf_dir, lambda t: t.pop("model.norm.weight"))
    assert eu_convert(["import", str(hf_dir), str(tmp_path / "ckpt"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("eu-convert import: error: missing tensor model.norm.weight")


@pytest.mark.parametrize(
    "argv, argument", [(["import", "gs://bucket/model", "OUT"], "src"), (["export", "CKPT", "s3://bucket/hf"], "out")]
)
def test_cli_refuses_urls_instead_of_writing_a_local_folder_named_after_them(tmp_path, capsys, monkeypatch, argv, argument):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stopped:
        eu_convert(argv)
    url = next(a for a in argv if "://" in a)
    assert stopped.value.code == 2 and f"error: argument {argument}: '{url}' is a URL" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_cli_paths_expand_the_home_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    args = build_parser().parse_args(["export", "~/run", "~/hf"])
    assert (args.ckpt, args.out) == (tmp_path / "run", tmp_path / "hf")


def test_cli_export_of_a_non_checkpoint(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert eu_convert(["export", str(tmp_path / "empty"), str(tmp_path / "out")]) == 2
    assert "is not an eu_jax checkpoint" in capsys.readouterr().err


def test_a_failed_read_stops_the_import_without_reading_the_remaining_layers(tmp_path, monkeypatch):
    """A tensor that cannot be read ends the import there: the layers queued behind it on the conversion
    threads are dropped, not read (an import of a large model would otherwise go on for minutes)."""
    from eu_jax.convert.hf_import import import_params
    from eu_jax.convert.safetensors_io import open_hf_weights
    from eu_jax.models.config import from_hf_config

    save_hf_model("llama", tmp_path / "hf", num_hidden_layers=24)
    config = from_hf_config(json.loads((tmp_path / "hf" / "config.json").read_text()))
    monkeypatch.setattr("eu_jax.convert.hf_import.conversion_threads", lambda: 2)
    stopping = threading.Event()

    class Pool(ThreadPoolExecutor):
        def shutdown(self, *args, **kwargs):
            stopping.set()  # lets the reads in flight finish
            super().shutdown(*args, **kwargs)

    monkeypatch.setattr("eu_jax.convert.hf_import.ThreadPoolExecutor", Pool)
    with open_hf_weights(tmp_path / "hf") as weights:
        read, started = weights.read, []

        def failing_read(name):
            started.append(name)
            if name == "model.layers.1.self_attn.q_proj.weight":
                raise WeightFormatError(f"{name} is damaged")
            if ".self_attn.q_proj." in name and name != "model.layers.0.self_attn.q_proj.weight":
                assert stopping.wait(timeout=60)  # later layers are held until the import gives up
            return read(name)

        monkeypatch.setattr(weights, "read", failing_read)
        with pytest.raises(WeightFormatError, match="q_proj.weight is damaged"):
            import_params(weights, config)
    queried = [name for name in started if name.endswith("self_attn.q_proj.weight")]
    assert 2 <= len(queried) <= 4  # layers 0 and 1, and at most what the two threads had already taken


@pytest.fixture(scope="module")
def imported_llama(tmp_path_factory):
    """A tiny llama's HF directory and its eu_jax checkpoint."""
    root = tmp_path_factory.mktemp("verify")
    save_hf_model("llama", root / "hf")
    import_checkpoint(root / "hf", root / "ckpt", progress=False)
    return root / "hf", root / "ckpt"


@pytest.fixture()
def no_model_work(monkeypatch):
    """Makes any eu_jax forward in verify fail the test: source errors must come before it."""

    def forbidden(*args, **kwargs):
        raise AssertionError("verify ran the eu_jax model before checking its source")

    monkeypatch.setattr("eu_jax.convert.verify.build_decoder", forbidden)


def one_error_line(capsys, command: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"eu-convert {command}: error: "), err
    return err[0]


@pytest.fixture()
def pickled_source(imported_llama, tmp_path):
    hf, ckpt = imported_llama
    (tmp_path / "hf").mkdir()
    for file in hf.iterdir():
        (tmp_path / "hf" / file.name).write_bytes(file.read_bytes())
    to_pickle(tmp_path / "hf")
    return tmp_path / "hf", ckpt


def test_verify_refuses_pickles_without_opt_in(pickled_source, capsys, no_model_work):
    """Like import: a pickle-only source is refused before any model work unless --allow-pickle is given."""
    source, ckpt = pickled_source
    assert eu_convert(["verify", str(source), str(ckpt)]) == 2
    line = one_error_line(capsys, "verify")
    assert f"{source / 'pytorch_model.bin'} is a pickle" in line and "--allow-pickle" in line


def test_verify_loads_pickles_with_opt_in_and_local_files_only(pickled_source, monkeypatch):
    source, ckpt = pickled_source
    calls = []
    from_pretrained = transformers.AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(
        transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **kw: calls.append(kw) or from_pretrained(*a, **kw)
    )
    assert eu_convert(["verify", str(source), str(ckpt), "--allow-pickle"]) == 0
    assert calls and all(kw["local_files_only"] and not kw["trust_remote_code"] for kw in calls)


@pytest.mark.parametrize(
    "source, message",
    [
        ("{tmp}/missing", "{tmp}/missing does not exist"),
        ("missing", "missing does not exist"),  # relative: a Hub repo id to transformers
        ("missing.gguf", "missing.gguf does not exist"),
        ("{tmp}", "{tmp} has no config.json"),
        ("{tmp}/folder.gguf", "{tmp}/folder.gguf is a folder, not a GGUF file"),
    ],
)
def test_verify_of_a_missing_source(imported_llama, tmp_path, capsys, monkeypatch, no_model_work, source, message):
    """Checked before any model work, never looked up on the Hub: one line and exit code 2 (1 means "too far
    apart")."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "folder.gguf").mkdir()
    source, message = source.format(tmp=tmp_path), message.format(tmp=tmp_path)
    assert eu_convert(["verify", source, str(imported_llama[1])]) == 2
    assert one_error_line(capsys, "verify").startswith(f"eu-convert verify: error: {message}")


def test_verify_reports_what_transformers_cannot_load(imported_llama, tmp_path, capsys):
    """A source that passes the checks but that transformers cannot load (here: no weights, which the pickle
    opt-in leaves to transformers) is one line and exit code 2 as well."""
    hf, ckpt = imported_llama
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_bytes((hf / "config.json").read_bytes())
    assert eu_convert(["verify", str(tmp_path / "hf"), str(ckpt), "--allow-pickle"]) == 2
    assert f"transformers cannot load {tmp_path / 'hf'}" in one_error_line(capsys, "verify")


def test_a_wrongly_typed_config_value_is_one_line_naming_the_file_and_field(hf_dir, tmp_path, capsys):
    edit_config(hf_dir, hidden_size="64")
    assert eu_convert(["import", str(hf_dir), str(tmp_path / "ckpt"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"eu-convert import: error: {hf_dir / 'config.json'} is not a valid llama config: ")
    assert "'hidden_size'" in err[0] and not (tmp_path / "ckpt").exists()


def test_a_broken_tokenizer_is_named_at_import(hf_dir, tmp_path):
    (hf_dir / "tokenizer.json").write_text("{bad")
    with pytest.raises(ValueError, match=rf"^the tokenizer of {hf_dir} \(.*tokenizer\.json.*\) does not load in transformers: "):
        import_checkpoint(hf_dir, tmp_path / "ckpt", progress=False)
    assert not (tmp_path / "ckpt").exists()


def test_import_of_a_config_json_that_leaves_out_defaults(tmp_path):
    """config.json may leave out fields transformers fills in (vocab_size: 32000 for llama)."""
    save_hf_model("llama", tmp_path / "hf", vocab_size=32000)
    edit = json.loads((tmp_path / "hf" / "config.json").read_text())
    del edit["vocab_size"]
    (tmp_path / "hf" / "config.json").write_text(json.dumps(edit))
    import_checkpoint(tmp_path / "hf", tmp_path / "ckpt", progress=False)
    assert load_model_meta(tmp_path / "ckpt").config.vocab_size == 32000


def test_config_without_a_required_field(hf_dir):
    raw = json.loads((hf_dir / "config.json").read_text())
    del raw["hidden_size"]
    with pytest.raises(UnsupportedModelError, match=r"^hf/config.json lacks 'hidden_size', which a llama model needs$"):
        from_hf_config(raw, "hf/config.json")


def test_python_file_with_a_dataclass_under_postponed_annotations(tmp_path):
    """dataclasses look the class's module up in sys.modules; a file that fails to run is not left there."""
    (tmp_path / "preset.py").write_text(
        "from __future__ import annotations\nimport dataclasses\n\n"
        "@dataclasses.dataclass\nclass Preset:\n    steps: int = 3\n"
    )
    assert load_python_file(tmp_path / "preset.py", package="test_presets").Preset().steps == 3
    (tmp_path / "broken.py").write_text("raise RuntimeError('broken preset')\n")
    with pytest.raises(RuntimeError, match="broken preset"):
        load_python_file(tmp_path / "broken.py", package="test_presets")
    assert not [name for name in sys.modules if name.startswith("test_presets.") and name.endswith(".broken")]
