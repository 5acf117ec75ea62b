"""Exporting the trained part on its own (adapters + added-token rows) and back over a base;
exporting Apple's format from a training work directory; optimize_mem_tokens end to end."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from clara_jax.clara import formats
from clara_jax.clara.config import ClaraConfig
from clara_jax.clara.model import Clara
from clara_jax.clara.tokenizer import ClaraTokenizer, train_sentencepiece
from clara_jax.convert import adapters as bundle_lib
from clara_jax.clara.formats.hf_mistral import save_checkpoint
from clara_jax.model.config import preset
from clara_jax.model.lora import LoraConfig
from clara_jax.model.mistral import init_params
from clara_jax.train import setup as setup_lib
from clara_jax.train import start as start_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
           JAX_PLATFORMS="cpu")


def leaves(tree):
    return {jax.tree_util.keystr(p): np.asarray(x)
            for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def assert_same(a, b):
    la, lb = leaves(a), leaves(b)
    assert la.keys() == lb.keys()
    for k in la:
        assert la[k].dtype == lb[k].dtype, k
        np.testing.assert_array_equal(la[k], lb[k], err_msg=k)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A base checkpoint (tiny Mistral + sentencepiece model) and a training work directory
    whose `model/` is a Clara over it with non-zero adapters and changed added-token rows."""
    root = tmp_path_factory.mktemp("bundle")
    words = ["Ana", "was", "born", "in", "Zan", "the", "city", "of", "Mirel", "works", "for",
             "Orvo", "shipping", "company", "founded", "by"]
    rng = np.random.RandomState(0)
    lines = [" ".join(rng.choice(words, 12)) for _ in range(400)]
    tok_path = train_sentencepiece(lines, str(root / "sp"), vocab_size=400)
    mcfg = preset("tiny", vocab_size=400, num_layers=2)
    base = jax.device_get(init_params(mcfg, jax.random.key(0)))
    save_checkpoint(str(root / "base"), mcfg, base, tok_path)

    cfg = ClaraConfig(doc_max_length=16, compress_rate=4, generation_top_k=2,
                      lora=LoraConfig(rank=4, alpha=8.0, dropout=0.1))
    tok = ClaraTokenizer.from_file(tok_path, cfg.n_mem)
    params = start_lib.resize_vocab(base, tok.vocab_size, np.random.default_rng(0))
    adapters = setup_lib.fresh_adapters(mcfg, cfg.lora, jax.random.key(1))
    adapters = jax.tree_util.tree_map(
        lambda x: np.asarray(x) + rng.normal(0, 0.01, x.shape).astype(np.float32), adapters)
    clara = Clara(mcfg.replace(vocab_size=tok.vocab_size), cfg, params, adapters, tok,
                  tokenizer_path=tok_path)
    workdir = root / "workdir"
    clara.save(str(workdir / "model"))
    return {"root": root, "base": str(root / "base"), "workdir": str(workdir),
            "clara": Clara.load(str(workdir))}


def test_bundle_round_trip_over_the_base_is_identical(trained, tmp_path):
    config = bundle_lib.export_trainable(trained["workdir"], str(tmp_path / "bundle"))
    clara = trained["clara"]
    n_added = clara.model_config.vocab_size - 400
    assert config["base_vocab_size"] == 400 and n_added == clara.config.num_added_tokens == 7
    assert config["tensors"]["added_tokens/embed_tokens"]["shape"] == [7, 128]
    assert config["tensors"]["added_tokens/lm_head"]["shape"] == [128, 7]
    assert config["adapters"] == ["decoder", "encoder", "query_reasoner"]
    # Only the trained part: far smaller than the base weights.
    size = os.path.getsize(tmp_path / "bundle" / bundle_lib.TENSORS_FILE)
    n_base = sum(x.size for x in jax.tree_util.tree_leaves(clara.params))
    n_adapters = sum(x.size for x in jax.tree_util.tree_leaves(clara.adapters))
    assert size < 4 * (n_adapters + 2 * 7 * 128) + 20_000 < 4 * n_base

    back = bundle_lib.import_trainable(str(tmp_path / "bundle"), trained["base"])
    assert_same(back.params, clara.params)
    assert_same(back.adapters, clara.adapters)
    assert back.config == clara.config and back.model_config == clara.model_config
    # ... and through save / load (what the import-adapters CLI writes).
    back.save(str(tmp_path / "imported"))
    assert_same(Clara.load(str(tmp_path / "imported")).adapters, clara.adapters)


def test_load_detects_the_format(trained, tmp_path):
    """`Clara.load` reads a saved model, a work directory or a bundle over its base; a bundle
    without a base, or a directory of no format, fails saying what is missing."""
    bundle_lib.export_trainable(trained["clara"], str(tmp_path / "bundle"))
    assert formats.detect(trained["workdir"]) == formats.OURS
    assert formats.detect(str(tmp_path / "bundle")) == formats.BUNDLE
    back = Clara.load(str(tmp_path / "bundle"), base_model_dir=trained["base"])
    assert_same(back.params, trained["clara"].params)
    assert_same(back.adapters, trained["clara"].adapters)
    with pytest.raises(ValueError, match="pass base_model_dir"):
        Clara.load(str(tmp_path / "bundle"))
    with pytest.raises(FileNotFoundError, match="not a CLaRa checkpoint"):
        Clara.load(str(tmp_path))


def test_bundle_over_the_wrong_base_or_with_a_bad_tensor_fails_naming_it(trained, tmp_path):
    bundle = tmp_path / "bundle"
    bundle_lib.export_trainable(trained["clara"], str(bundle))
    other = preset("tiny", vocab_size=400, num_layers=3)
    save_checkpoint(str(tmp_path / "other"), other,
                    jax.device_get(init_params(other, jax.random.key(0))),
                    os.path.join(trained["base"], "tokenizer.model"))
    with pytest.raises(ValueError, match="base model num_layers = 3, but the bundle .* was "
                                         "trained over num_layers = 2"):
        bundle_lib.import_trainable(str(bundle), str(tmp_path / "other"))
    cfg = json.loads((bundle / bundle_lib.CONFIG_FILE).read_text())
    cfg["tensors"]["added_tokens/lm_head"]["shape"] = [128, 8]
    (bundle / bundle_lib.CONFIG_FILE).write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"tensor added_tokens/lm_head has shape \(128, 7\), "
                                         r"trainable_config.json says \[128, 8\]"):
        bundle_lib.import_trainable(str(bundle), trained["base"])
    with pytest.raises(FileNotFoundError, match="missing trainable_config.json"):
        bundle_lib.import_trainable(str(tmp_path), trained["base"])


def test_cli_exports_apple_format_and_adapters_from_a_work_directory(trained, tmp_path):
    """`export-apple` and `export-adapters` accept a training work directory; the Apple
    release reads back (over the base) to the same arrays, the bundle imports via the CLI."""
    torch = pytest.importorskip("torch")
    from clara_jax.clara.formats.apple import load_apple
    from clara_jax.clara.formats.hf_mistral import load_checkpoint

    def cli(*args):
        proc = subprocess.run([sys.executable, "-m", "clara_jax.convert", *args], cwd=ROOT,
                              env=ENV, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]

    work = trained["workdir"]
    cli("export-apple", f"--checkpoint={work}", f"--out_dir={tmp_path / 'apple'}")
    cli("export-adapters", f"--checkpoint={work}", f"--out_dir={tmp_path / 'bundle'}")
    cli("import-adapters", f"--adapters_dir={tmp_path / 'bundle'}",
        f"--base_model_dir={trained['base']}", f"--out_dir={tmp_path / 'imported'}")
    clara = trained["clara"]
    assert set(torch.load(tmp_path / "apple" / "adapters.pth", weights_only=True)) == {
        "encoder_adapter", "decoder_adapter", "query_reasoner_adapter"}
    base_cfg, base = load_checkpoint(trained["base"])
    _, cfg, params, adapters, _ = load_apple(str(tmp_path / "apple"), base, base_cfg)
    assert cfg.n_mem == clara.config.n_mem and cfg.lora.rank == 4
    assert_same(params, jax.device_get(clara.params))
    assert_same(adapters, jax.device_get(clara.adapters))
    imported = Clara.load(str(tmp_path / "imported"))
    assert_same(imported.params, clara.params)
    assert_same(imported.adapters, clara.adapters)


@pytest.mark.slow
def test_optimize_mem_tokens_run_changes_only_memory_rows_and_exports(tmp_path):
    """Stage 1 (no memory-token training) then stage 2 with optimize_mem_tokens from it: the
    exported model's embedding differs from stage 1's only in the memory tokens' rows, lm_head
    not at all; the bundle of the stage-2 work directory round-trips over stage 1's base."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from test_train import tiny_run

    common = dict(max_len=192, doc_max_length=16, num_candidates=8, generation_top_k=2)
    tiny_run(tmp_path / "s1", "configs/pretrain.py", 1, optimize_mem_tokens=False, **common)
    tiny_run(tmp_path / "s2", "configs/instruct.py", 2, init_from=str(tmp_path / "s1"),
             optimize_mem_tokens=True, peak_flops=1e9, **common)
    s1, s2 = Clara.load(str(tmp_path / "s1")), Clara.load(str(tmp_path / "s2"))
    first, n = s2.config.first_mem_token_id, s2.config.n_mem
    e1 = np.asarray(s1.params["embed_tokens"]["embedding"])
    e2 = np.asarray(s2.params["embed_tokens"]["embedding"])
    np.testing.assert_array_equal(e2[:first], e1[:first])
    np.testing.assert_array_equal(e2[first + n:], e1[first + n:])   # <AE>, <ENC>, <SEP>
    assert np.all(np.abs(e2[first:first + n] - e1[first:first + n]).max(axis=1) > 0)
    np.testing.assert_array_equal(s2.params["lm_head"]["kernel"], s1.params["lm_head"]["kernel"])
    rows = [json.loads(l) for l in open(tmp_path / "s2" / "metrics.jsonl")]
    assert rows[-1]["mfu"] == pytest.approx(rows[-1]["model_flops_per_s"] /
                                            (1e9 * jax.device_count()))
    # The stage-2 bundle over stage 1's base rows (a saved base checkpoint of them).
    base_dir = tmp_path / "s1_base"
    base_vocab = s2.tokenizer.base_vocab_size
    params = {**jax.device_get(s1.params),
              "embed_tokens": {"embedding": e1[:base_vocab]},
              "lm_head": {"kernel": np.asarray(s1.params["lm_head"]["kernel"])[:, :base_vocab]}}
    save_checkpoint(str(base_dir), s1.model_config.replace(vocab_size=base_vocab), params,
                    s1.tokenizer_path)
    bundle_lib.export_trainable(str(tmp_path / "s2"), str(tmp_path / "bundle"))
    back = bundle_lib.import_trainable(str(tmp_path / "bundle"), str(base_dir))
    assert_same(back.params, s2.params)
    assert_same(back.adapters, s2.adapters)
