"""Tests of the LM workflow (opt_fast.train.lm): CLI short run, resume, DDP on gloo, fine-tuning variants,
merge/save/reload, the missing-extra message. llama-tiny on a small slice of the standard library."""
import dataclasses
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers", reason="the LM workflow needs the [lm] extra")

from opt_fast.train.lm import data as D  # noqa: E402
from opt_fast.train.lm.config import LMConfig  # noqa: E402
from opt_fast.train.lm.loop import train_lm  # noqa: E402

PY = sys.executable
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = dict(model="llama-tiny", corpus_mb=0.2, vocab_size=512, seq_len=64, batch_size=4, val_tokens=512,
             eval_every=3, progress=False, threads=1)
SMALL_ARGS = ["--dataset", "stdlib", "--model", "llama-tiny", "--corpus-mb", "0.2", "--vocab-size", "512",
              "--seq-len", "64", "--batch-size", "4", "--val-tokens", "512", "--eval-every", "3", "--no-progress"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("lmcache"))
    D.prepare("stdlib", "bpe", 512, 0.2, path)  # tokenizer + token arrays once for the module
    return path


def _cfg(cache, **kw):
    return LMConfig(**dict(SMALL, cache_dir=cache, **kw))


def _env(cache):
    env = dict(os.environ, OPT_FAST_CACHE=cache, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("WORLD_SIZE", None)
    return env


# ---- data ------------------------------------------------------------------------------------------------------
def test_split_is_deterministic_and_by_file(tmp_path):
    for i in range(60):
        (tmp_path / f"f{i}.txt").write_text(f"file {i}\n" * 20)
    docs = D.list_docs(str(tmp_path))
    a = D.split_docs(docs, None)
    b = D.split_docs(list(reversed(docs)), None)
    assert {s: [d.key for d in v] for s, v in a.items()} == {s: [d.key for d in v] for s, v in b.items()}
    keys = [d.key for s in D.SPLITS for d in a[s]]
    assert sorted(keys) == sorted(d.key for d in docs)  # every file in exactly one split
    assert all(D.split_of(d.key) == s for s in D.SPLITS for d in a[s])
    one = tmp_path / "one.txt"
    one.write_text("line\n" * 1000)
    assert [d.key for d in D.list_docs(str(one))] == [f"one.txt:{k}" for k in range(6)]  # 200-line pieces


def test_unreadable_cache_entries_are_rebuilt(tmp_path, cache, capsys):
    import shutil
    copy = tmp_path / "cache"
    shutil.copytree(cache, copy)
    before = D.prepare("stdlib", "bpe", 512, 0.2, str(copy))
    for f in copy.iterdir():   # truncated token arrays and tokenizer (a full disk, a killed copy)
        if f.suffix in (".npy", ".json"):
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    after = D.prepare("stdlib", "bpe", 512, 0.2, str(copy))
    assert "is unreadable" in capsys.readouterr().err
    assert all((after.tokens[k] == before.tokens[k]).all() for k in before.tokens)


def test_bytes_tokenizer_and_windows(tmp_path):
    (tmp_path / "a").mkdir()
    for i in range(40):
        (tmp_path / "a" / f"{i}.py").write_text("print('héllo')\n" * (i + 1))
    c = D.prepare(str(tmp_path / "a"), "bytes", cache_dir=str(tmp_path / "c"), splits=("train",))
    assert c.vocab_size == 257 and int(c.tokens["train"].max()) == 256  # documents end with the EOT id
    w = D.Windows(c.tokens["train"], 16, "train")
    full = w.train_batch(3, 8, seed=1)
    shards = torch.cat([w.train_batch(3, 8, seed=1, rank=r, world=2) for r in range(2)])
    assert torch.equal(full, shards)  # the ranks' shares make up the global batch
    assert not torch.equal(w.train_batch(3, 8, seed=2), full)


# ---- CLI short run: train, validate, checkpoint, merge + save_pretrained + reload --------------------------------
def test_cli_short_run_merge_save_reload(tmp_path, cache):
    out = tmp_path / "run"
    r = subprocess.run([PY, "-m", "opt_fast.train", *SMALL_ARGS, "--method", "cayley", "--steps", "8",
                        "--merge-every", "3", "--out", str(out)], capture_output=True, text=True,
                       env=_env(cache), cwd=str(tmp_path), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "val" in r.stdout and "tok/s" in r.stdout
    m = json.loads((out / "metrics.json").read_text())
    assert [h["step"] for h in m["history"]] == [0, 3, 6, 8] and len(m["losses"]) == 8
    assert m["history"][-1]["val_loss"] < m["history"][0]["val_loss"]
    assert m["history"][-1]["val_ppl"] == pytest.approx(torch.tensor(m["history"][-1]["val_loss"]).exp().item())
    ex = m["export"]
    assert ex["linear_types"] == ["Linear"] and ex["reload_identical"]
    assert ex["max_abs_logit_diff_merge"] < 1e-4  # OPT layers vs merged plain Linear: rounding only
    assert (out / "model" / "model.safetensors").is_file() and (out / "checkpoint.pt").is_file()
    assert m["spectrum"]["max_rel"] < 1e-4  # exact Cayley: svdvals of W = those of the last-merge W0
    assert m["export"]["max_abs_logit_diff_reload"] == 0.0


# ---- resume gives the same curve ------------------------------------------------------------------------------
# (torch.optim.Muon runs Newton-Schulz in bfloat16: slow on CPU, so its run is shorter)
@pytest.mark.parametrize("method,optimizer,steps,stop", [("cayley_neumann", "adamw", 7, 4), ("none", "muon", 4, 2)])
def test_resume_equals_uninterrupted(tmp_path, cache, method, optimizer, steps, stop):
    kw = dict(method=method, optimizer=optimizer, steps=steps, merge_every=3)
    full = train_lm(_cfg(cache, out=str(tmp_path / "full"), **kw))
    part = train_lm(_cfg(cache, out=str(tmp_path / "part"), stop_after=stop, **kw))  # interrupted (after a merge)
    # the stopped run's final validation is its last step's, not that of the evaluation before it
    assert part["history"][-1]["step"] < stop and part["final_val_loss"] != part["history"][-1]["val_loss"]
    resumed = train_lm(_cfg(cache, out=str(tmp_path / "part"), resume=str(tmp_path / "part" / "checkpoint.pt"), **kw))
    assert resumed["losses"] == full["losses"]
    assert [h["val_loss"] for h in resumed["history"]] == [h["val_loss"] for h in full["history"]]
    # the train loss of each record averages the same steps as the uninterrupted run's
    assert [h["train_loss"] for h in resumed["history"]] == [h["train_loss"] for h in full["history"]]
    for changed in (dict(steps=steps + 1), dict(warmup=3), dict(clip=0.5)):
        with pytest.raises(SystemExit, match="--" + next(iter(changed))):
            train_lm(_cfg(cache, out=str(tmp_path / "x"), resume=str(tmp_path / "part" / "checkpoint.pt"),
                          **dict(kw, **changed)))


# ---- DDP: 2 gloo processes = 1 process with the same global batch ----------------------------------------------
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_gloo_processes_match_one(tmp_path, cache):
    kw = ["--method", "cayley_neumann", "--steps", "6", "--merge-every", "2"]
    out = tmp_path / "ddp"
    r = subprocess.run([PY, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                        "--master_port", str(_free_port()), "-m", "opt_fast.train", *SMALL_ARGS, *kw, "--out", str(out)],
                       capture_output=True, text=True, env=_env(cache), cwd=str(tmp_path), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    ddp = json.loads((out / "metrics.json").read_text())
    one = train_lm(_cfg(cache, method="cayley_neumann", steps=6, merge_every=2))
    assert ddp["world_size"] == 2 and one["world_size"] == 1
    # same data, same math; only the summation order of the gradient average differs
    assert ddp["losses"] == pytest.approx(one["losses"], rel=1e-4)
    assert ddp["final_val_loss"] == pytest.approx(one["final_val_loss"], rel=1e-4)
    # merges stayed identical across ranks (the loop compares W0 / permutation fingerprints after each merge)
    assert "different W0" not in r.stderr


# ---- --grad-checkpointing and --autocast bf16 -------------------------------------------------------------------
def test_grad_checkpointing_and_autocast(cache):
    """Gradient checkpointing changes nothing but memory (same losses); bf16 autocast trains close to float32
    (a merge included: merge_every 2), its rotation parameters float32."""
    kw = dict(method="cayley_neumann", steps=4, merge_every=2)
    plain = train_lm(_cfg(cache, **kw))
    ckpt = train_lm(_cfg(cache, grad_checkpointing=True, **kw))
    assert ckpt["losses"] == pytest.approx(plain["losses"], rel=1e-5)
    bf16, model = train_lm(_cfg(cache, autocast="bf16", grad_checkpointing=True, **kw), return_model=True)
    assert bf16["losses"] == pytest.approx(plain["losses"], rel=2e-2)
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if n.endswith("_blocks"))
    with pytest.raises(SystemExit, match="--autocast must be bf16"):
        train_lm(_cfg(cache, autocast="fp8", **kw))


# ---- FSDP2: each decoder layer and the root sharded, 2 gloo processes = 1 process, across a merge ----------------
@pytest.mark.parametrize("options", [["--per-layer"], ["--per-layer", "--shard-w0", "--reset"]],
                         ids=["w0-whole", "w0-sharded-reset"])
def test_fsdp2_per_layer_with_merge_matches_one_process(tmp_path, options):
    """W0 a buffer (whole on every rank) or, after prepare_fsdp, a frozen parameter sharded by fully_shard
    (the probe checks each rank holds 1/2 of every W0, and the merge re-shards the merged weight), there
    with the block layers re-initialised after sharding (reset_parameters on shards = on the whole)."""
    probe = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "lm_fsdp_probe.py")
    r = subprocess.run([PY, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                        "--master_port", str(_free_port()), probe, *options, "--steps", "4"],
                       capture_output=True, text=True, cwd=str(tmp_path), timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "max relative difference" in r.stdout


# ---- fine-tuning: OFT-style block layers, full, PEFT LoRA / OFT; merge + save + reload -----------------------------
def test_finetune_variants_merge_save_reload(tmp_path, cache):
    pytest.importorskip("peft")
    pre = str(tmp_path / "pre")
    train_lm(_cfg(cache, method="none", steps=3, out=pre))
    start = {}
    for method in ("cayley_neumann", "none", "peft-lora", "peft-oft"):
        m = train_lm(_cfg(cache, method=method, steps=3, from_checkpoint=pre, out=str(tmp_path / method)))
        ex = m["export"]
        assert ex["reload_identical"] and ex["linear_types"] == ["Linear"], (method, ex)
        assert ex["max_abs_logit_diff_merge"] < 1e-4, (method, ex)
        start[method] = m["history"][0]["val_loss"]
        if method != "none":  # adapters only: embeddings, norms and lm_head frozen
            assert m["trained_parameters"] < 0.3 * m["parameters"], (method, m["trained_parameters"])
    # every variant starts as the pretrained model itself (R = I, LoRA B = 0)
    assert max(start.values()) - min(start.values()) < 1e-4, start
    with pytest.raises(SystemExit, match="needs --from-checkpoint"):
        train_lm(_cfg(cache, method="peft-lora", steps=2))


# ---- the missing extra --------------------------------------------------------------------------------------------
def test_missing_transformers_names_the_extra(monkeypatch, cache):
    from opt_fast.train import main
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    with pytest.raises(SystemExit, match=r"opt-fast\[lm\]"):
        main(SMALL_ARGS + ["--steps", "2", "--cache-dir", cache])


# ---- --compare: one table and one plot; a restarted comparison reuses its finished runs --------------------------
def test_compare_table_plot_and_reuse(tmp_path, cache, capsys):
    from opt_fast.train.lm.compare import run_compare
    cfg = _cfg(cache, steps=2, out=str(tmp_path / "cmp"))
    res = run_compare(cfg, ["none+adamw", "cayley"])
    assert set(res) == {"none+adamw", "cayley"}
    text = (tmp_path / "cmp" / "compare.md").read_text()
    assert "| none+adamw |" in text and "| cayley |" in text and "1.00×" in text
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 0
    again = run_compare(dataclasses.replace(cfg, progress=True, threads=2), ["none+adamw", "cayley"])
    assert "reusing the finished run" in capsys.readouterr().out   # how a run is shown or paced: still reused
    assert again["cayley"]["losses"] == res["cayley"]["losses"]
