"""bipost tests. CPU by default: `python -m pytest -q test_bipost.py`. GPU-only tests: `-m gpu`."""
import os, sys, json, math, subprocess
import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, ROOT)

# ---- configurator ----
from configurator import configure, ConfigError


def test_configurator_files_overrides_and_types(tmp_path):
    config = {'batch_size': 8, 'learning_rate': 1e-3, 'deepspeed': False, 'out_dir': 'out', 'weights': [0.5, 0.5],
              'init_from': 'scratch'}
    recipe = tmp_path / 'recipe.py'
    recipe.write_text("import math\nbatch_size = 4\nlearning_rate = math.sqrt(1e-6)\n")
    changed = configure(config, [str(recipe), '--deepspeed=True', '--learning_rate=2', '--weights=[0.25, 0.75]',
                                 '--out_dir=runs/a=b', '--init_from=/models/x'], verbose=False)
    assert config == {'batch_size': 4, 'learning_rate': 2.0, 'deepspeed': True, 'out_dir': 'runs/a=b',
                      'weights': [0.25, 0.75], 'init_from': '/models/x'}
    assert type(config['learning_rate']) is float and set(changed) == set(config)


@pytest.mark.parametrize('argv, words', [
    (['--batch_sise=4'], ["unknown config key 'batch_sise'", "batch_size"]),
    (['--batch_size=4.5'], ['batch_size must be int', '4.5']),
    (['--deepspeed=1'], ['deepspeed must be bool']),
    (['--batch_size'], ['expected --key=value']),
    (['nope/missing.py'], ['nope/missing.py', 'not found']),
])
def test_configurator_errors(argv, words):
    with pytest.raises(ConfigError) as e:
        configure({'batch_size': 8, 'deepspeed': False}, argv, verbose=False)
    for w in words:
        assert w in str(e.value)


def test_configurator_unknown_key_in_file(tmp_path):
    recipe = tmp_path / 'typo.py'
    recipe.write_text("batch_size = 2\nlearning_rat = 0.1\n")
    with pytest.raises(ConfigError, match=r"typo.py: unknown config key 'learning_rat'"):
        configure({'batch_size': 8, 'learning_rate': 1e-3}, [str(recipe)], verbose=False)


def test_configurator_prints_on_rank0_only(capsys, monkeypatch):
    monkeypatch.setenv('RANK', '1')
    configure({'batch_size': 8}, ['--batch_size=2'])
    assert capsys.readouterr().out == ''
    monkeypatch.setenv('RANK', '0')
    configure({'batch_size': 8}, ['--batch_size=2'])
    assert 'overriding: batch_size = 2' in capsys.readouterr().out


# ---- data ----

import data.prepare as data_prep

def _data_read(out_dir, split):
    """[[prompt ids, response ids, ...], ...] read back from <split>.bin + <split>_index.npy."""
    tokens = np.fromfile(os.path.join(out_dir, f"{split}.bin"), dtype=np.uint32)
    index = np.load(os.path.join(out_dir, f"{split}_index.npy"))
    assert index.dtype == np.int64 and index[-1, 0] + index[-1, 1:].sum() == len(tokens)
    rows = []
    for offset, *lengths in index.tolist():
        spans = []
        for n in lengths:
            spans.append(tokens[offset:offset + n].tolist())
            offset += n
        rows.append(spans)
    return rows

def _data_decode(rows):
    enc = data_prep.demo_encoding()
    return [[enc.decode(ids) for ids in row] for row in rows]

def _data_hf_tokenizer(path, chat_template):
    """A tiny byte-level BPE tokenizer trained in-process and saved like a model dir (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
    from transformers import PreTrainedTokenizerFast
    specials = ["<|bos|>", "<|end|>", "<|user|>", "<|assistant|>"]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer, tk.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tk.train_from_iterator(["What is 2+2? 4", "Reverse: cat tac", "hello world"] * 10, trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|bos|>", eos_token="<|end|>")
    hf.chat_template = chat_template
    hf.save_pretrained(path)
    return hf

CHAT = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")

def test_data_roundtrip_sft_shapes(tmp_path):
    records = [{"prompt": "What is 2+2?\n", "completion": "4"},
               {"messages": [{"role": "user", "content": "Reverse: cat"}, {"role": "assistant", "content": "tac"}]},
               {"prompt": "héllo <|endoftext|>", "completion": "wörld"}]  # special-looking text stays text
    meta = data_prep.prepare(str(tmp_path), "demo", {"sft_train": records}, max_length=64)
    assert meta["vocab_size"] == 257 and meta["eos_id"] == meta["pad_id"] == 256
    assert meta["splits"]["sft_train"] == dict(kind="sft", examples=3, tokens=meta["splits"]["sft_train"]["tokens"],
                                               truncated=0, dropped=0, max_length=64)
    assert json.load(open(tmp_path / "meta.json")) == meta
    rows = _data_read(tmp_path, "sft_train")
    assert all(row[1][-1] == 256 and 256 not in row[0] + row[1][:-1] for row in rows)  # EOS ends each response, only there
    assert _data_decode(rows) == [["What is 2+2?\n", "4<|endoftext|>"],
                                  ["user: Reverse: cat\nassistant: ", "tac\n<|endoftext|>"],
                                  ["héllo <|endoftext|>", "wörld<|endoftext|>"]]

def test_data_roundtrip_pref_shapes(tmp_path):
    records = [{"prompt": "What is 2+2?\n", "chosen": "The answer is 4.", "rejected": "5"},
               {"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "hello"}],
                "rejected": [{"role": "assistant", "content": "go away"}]}]
    meta = data_prep.prepare(str(tmp_path), "demo", {"pref_val": records}, max_length=64)
    assert meta["splits"]["pref_val"]["kind"] == "pref" and np.load(tmp_path / "pref_val_index.npy").shape == (2, 4)
    assert _data_decode(_data_read(tmp_path, "pref_val")) == [
        ["What is 2+2?\n", "The answer is 4.<|endoftext|>", "5<|endoftext|>"],
        ["user: hi\nassistant: ", "hello\n<|endoftext|>", "go away\n<|endoftext|>"]]

def test_data_hf_tokenizer_chat_template(tmp_path):
    hf = _data_hf_tokenizer(tmp_path / "tok", CHAT)
    user = [{"role": "user", "content": "What is 2+2?"}]
    sft = [{"messages": user + [{"role": "assistant", "content": "4"}]}]
    pref = [{"prompt": user, "chosen": [{"role": "assistant", "content": "4"}],
             "rejected": [{"role": "assistant", "content": "5"}]}]
    meta = data_prep.prepare(str(tmp_path / "out"), str(tmp_path / "tok"), {"sft_train": sft, "pref_train": pref}, 64)
    assert meta["tokenizer"] == str(tmp_path / "tok") and meta["vocab_size"] == len(hf) and meta["eos_id"] == hf.eos_token_id
    full = hf.encode(hf.apply_chat_template(sft[0]["messages"], tokenize=False), add_special_tokens=False)
    (prompt, response), = _data_read(tmp_path / "out", "sft_train")
    assert prompt + response == full  # the template was applied and the prompt is a prefix of prompt+response
    assert hf.decode(prompt) == "<|bos|><|user|>What is 2+2?<|end|><|assistant|>"
    assert response[-1] == hf.eos_token_id and response.count(hf.eos_token_id) == 1  # the template's EOS, not a second one
    (prompt, chosen, rejected), = _data_read(tmp_path / "out", "pref_train")
    assert hf.decode(prompt + chosen) == "<|bos|><|user|>What is 2+2?<|end|><|assistant|>4<|end|>"
    assert hf.decode(rejected) == "5<|end|>"
    # a template that renders the prompt differently once an answer follows cannot give prefix-consistent tokens
    _data_hf_tokenizer(tmp_path / "bad", CHAT.replace("<|assistant|>{% endif %}", "<|user|>{% endif %}"))
    with pytest.raises(data_prep.DataError, match="prefix"):
        data_prep.prepare(str(tmp_path / "out2"), str(tmp_path / "bad"), {"sft_train": sft}, 64)
    with pytest.raises(data_prep.DataError, match="one tokenizer"):  # merging into a demo-tokenized directory
        data_prep.prepare(str(tmp_path / "out"), "demo", {"sft_val": [{"prompt": "a", "completion": "b"}]}, 64)

def test_data_truncation_and_drop(tmp_path):
    records = [{"prompt": "abcdefgh", "completion": "xyz"},       # 8 + 4 tokens: cut the prompt's start
               {"prompt": "ab", "completion": "0123456789abc"},   # 2 + 14: prompt down to 1, then the response's end
               {"prompt": "ok", "completion": "fine"}]            # 2 + 5: fits
    meta = data_prep.prepare(str(tmp_path / "t"), "demo", {"sft_train": records}, max_length=10)
    assert (meta["splits"]["sft_train"]["truncated"], meta["splits"]["sft_train"]["dropped"]) == (2, 0)
    assert _data_decode(_data_read(tmp_path / "t", "sft_train")) == [
        ["cdefgh", "xyz<|endoftext|>"], ["b", "012345678"], ["ok", "fine<|endoftext|>"]]
    meta = data_prep.prepare(str(tmp_path / "d"), "demo", {"sft_train": records}, max_length=10, truncation="drop")
    assert meta["splits"]["sft_train"] == dict(kind="sft", examples=1, tokens=7, truncated=0, dropped=2, max_length=10)
    pairs = [{"prompt": "p", "chosen": "same", "rejected": "same"}, {"prompt": "p", "chosen": "good", "rejected": "bad"}]
    meta = data_prep.prepare(str(tmp_path / "p"), "demo", {"pref_train": pairs}, max_length=10)
    assert (meta["splits"]["pref_train"]["examples"], meta["splits"]["pref_train"]["dropped"]) == (1, 1)
    with pytest.raises(data_prep.DataError, match="dropped"):
        data_prep.prepare(str(tmp_path / "x"), "demo", {"sft_train": records[:2]}, max_length=10, truncation="drop")
    assert not (tmp_path / "x").exists()

@pytest.mark.parametrize("lines, line, says", [
    (['{"prompt": "a", "completion": "b"}', '{"prompt": "a", "completion": "b"'], 2, "invalid JSON"),
    (['{"prompt": "a", "completion": "b"}', '', '{"prompt": "a"}'], 3, "missing key(s) completion"),
    (['{"prompt": "a", "completion": "  "}'], 1, '"completion" is empty'),
    (['{"prompt": "", "completion": "b"}'], 1, '"prompt" is empty'),
    (['{"prompt": 3, "completion": "b"}'], 1, "must be a string"),
    (['["prompt", "completion"]'], 1, "expected a JSON object"),
    (['{"messages": [{"role": "user", "content": "hi"}]}'], 1, "must end with an assistant message"),
    (['{"prompt": "a", "chosen": "b", "rejected": "c"}', '{"prompt": "a", "chosen": "b"}'], 2, "missing key(s) rejected"),
    (['{"prompt": "a", "chosen": "b", "rejected": ""}'], 1, '"rejected" is empty'),
    (['{"prompt": [{"role": "user", "content": "a"}], "chosen": "b", "rejected": "c"}'], 1, "list of"),
])
def test_data_bad_input_names_file_and_line(tmp_path, lines, line, says):
    good, bad = tmp_path / "good.jsonl", tmp_path / "bad.jsonl"
    good.write_text('{"prompt": "a", "completion": "b"}\n')
    bad.write_text("\n".join(lines) + "\n")
    name = "pref_train" if "chosen" in lines[0] else "sft_train"
    with pytest.raises(data_prep.DataError) as error:
        data_prep.prepare(str(tmp_path / "out"), "demo", {"sft_val": str(good), name: str(bad)}, max_length=32)
    assert f"bad.jsonl:{line}:" in str(error.value) and says in str(error.value)
    assert not (tmp_path / "out").exists()  # nothing written, not even the good split

def test_data_bad_input_other_cases(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    (tmp_path / "prefs.jsonl").write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    data_prep.prepare(str(tmp_path / "out"), "demo", {"sft_val": [{"prompt": "a", "completion": "b"}]}, 32)
    before = {p: open(tmp_path / "out" / p, "rb").read() for p in os.listdir(tmp_path / "out")}
    for splits, says in [({"sft_train": str(tmp_path / "empty.jsonl")}, "empty.jsonl: the file is empty"),
                         ({"sft_train": str(tmp_path / "missing.jsonl")}, "missing.jsonl: no such file"),
                         ({"sft_train": str(tmp_path / "prefs.jsonl")}, "prefs.jsonl:1: split 'sft_train' is named like")]:
        with pytest.raises(data_prep.DataError, match=says):
            data_prep.prepare(str(tmp_path / "out"), "demo", splits, 32)
    after = {p: open(tmp_path / "out" / p, "rb").read() for p in os.listdir(tmp_path / "out")}
    assert after == before  # an existing directory is untouched by a failed run
    with pytest.raises(data_prep.DataError, match="offline"):
        data_prep.prepare(str(tmp_path / "x"), "no_such_encoding", {"sft_train": []}, 32)

def test_data_cli(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": ""}\n')
    (tmp_path / "prefs.jsonl").write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    cmd = [sys.executable, os.path.join(ROOT, "data", "prepare.py"), f"--out_dir={tmp_path / 'out'}", "--tokenizer=demo",
           "--max_length=16"]
    bad = subprocess.run(cmd + [f"sft_train={tmp_path / 'train.jsonl'}"], capture_output=True, text=True)
    assert bad.returncode == 1 and "train.jsonl:2:" in bad.stderr and "Traceback" not in bad.stderr
    ok = subprocess.run(cmd + [f"pref_train={tmp_path / 'prefs.jsonl'}"], capture_output=True, text=True)
    assert ok.returncode == 0 and "pref_train" in ok.stdout, ok.stderr
    assert json.load(open(tmp_path / "out" / "meta.json"))["splits"]["pref_train"]["examples"] == 1

def test_data_demo_deterministic_and_conflicting(tmp_path):
    from data.demo import prepare as demo
    demo.main(str(tmp_path))
    shipped = os.path.join(ROOT, "data", "demo")
    for name in os.listdir(tmp_path):  # byte-identical to the shipped files (and so to any earlier run)
        assert open(tmp_path / name, "rb").read() == open(os.path.join(shipped, name), "rb").read(), \
            f"{name} differs from data/demo: run python data/demo/prepare.py"
    splits, corrupt = demo.build()
    answer = {r["prompt"]: r["completion"] for name in ("sft_train", "sft_val") for r in splits[name]}
    prompts = lambda name: {r["prompt"] for r in splits[name]}
    assert not prompts("sft_val") & (prompts("sft_train") | prompts("pref_train") | prompts("sft_trusted"))
    assert not prompts("sft_trusted") & prompts("sft_train")
    assert all(r["completion"].startswith("The answer is ") for r in splits["sft_train"] + splits["sft_trusted"])
    for name in ("pref_train", "pref_val"):  # half style pairs (terse over the SFT answer), half correctness pairs
        style = [f"The answer is {r['chosen']}." == r["rejected"] == answer[r["prompt"]] for r in splits[name]]
        right = [r["chosen"] == answer[r["prompt"]] != r["rejected"] and r["rejected"].startswith("The answer is ")
                 for r in splits[name]]
        assert sum(style) == sum(right) == len(splits[name]) // 2 and not any(map(all, zip(style, right)))
    for name in ("sft", "pref"):
        clean, noisy, labels = splits[f"{name}_train"], splits[f"{name}_noisy_train"], corrupt[f"{name}_noisy_train"]
        assert labels.dtype == bool and labels.mean() == 0.25 and len(noisy) == len(clean)
        assert [a != b for a, b in zip(clean, noisy)] == labels.tolist()
        assert (np.load(tmp_path / f"{name}_noisy_train_corrupt.npy") == labels).all()

# ---- objectives ----

# ---- kernels ----

# On CPU the Triton kernels (fused=True) run in Triton's interpreter, which must be switched on before
# triton is first imported: kernels/ does that itself when CUDA is absent.
import kernels.logprob
from kernels.logprob import token_logprobs
from kernels.dpo import dpo_losses
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
_triton_runs = kernels.logprob.triton is not None and (
    torch.cuda.is_available() or type(kernels.logprob.triton.language.zeros).__name__ == "InterpretedFunction")
FUSED = [False, pytest.param(True, marks=pytest.mark.skipif(
    not _triton_runs, reason="triton missing, or imported without TRITON_INTERPRET=1 before kernels/ on CPU"))]

def _reference_logprobs(h, w, t, mask):
    """fp32 log_softmax().gather() on the full logits, 0 where masked."""
    logp = (h.double() @ w.double().T).log_softmax(-1).gather(-1, t.clamp(min=0)[..., None]).squeeze(-1)
    return torch.where(mask, logp, 0.0).float() if mask is not None else logp.float()

def _logprob_case(N, H, V, masked, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g).requires_grad_()
    w = (torch.randn(V, H, generator=g) * 0.5).requires_grad_()  # logit std ~ 2.5: peaked softmax
    t = torch.randint(0, V, (N,), generator=g)
    mask = None
    if masked:
        mask = torch.rand(N, generator=g) > 0.4
        mask[0] = True
        t[~mask] = -100  # masked targets may be anything
    return h, w, t, mask

# N, V not multiples of the tiles (interpreter tiles 16 x 32); one token; masked rows; no mask
@pytest.mark.parametrize("fused", FUSED)
@pytest.mark.parametrize("N,H,V,masked", [(37, 24, 101, True), (1, 8, 33, False), (50, 16, 64, False)])
def test_kernel_logprob_matches_reference(fused, N, H, V, masked, monkeypatch):
    # small chunks so both implementations cross chunk boundaries (a ragged last one included)
    monkeypatch.setattr(kernels.logprob, "GRAD_CHUNK_ELEMS", 32 * N)
    h, w, t, mask = _logprob_case(N, H, V, masked)
    g = torch.randn(N)
    ref = _reference_logprobs(h, w, t, mask)
    dh_ref, dw_ref = torch.autograd.grad((ref * g).sum(), (h, w))
    out = token_logprobs(h, w, t, mask, fused=fused, chunk_rows=7)
    dh, dw = torch.autograd.grad((out * g).sum(), (h, w))
    assert out.dtype == torch.float32 and out.shape == (N,)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)  # fp32 vs fp64-computed reference
    torch.testing.assert_close(dh, dh_ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(dw, dw_ref, atol=1e-5, rtol=1e-4)
    if mask is not None:
        assert (out[~mask] == 0).all() and (dh[~mask] == 0).all()

@pytest.mark.parametrize("fused", FUSED)
def test_kernel_logprob_fully_masked_and_batched_shapes(fused):
    h, w, t, _ = _logprob_case(12, 8, 40, False)
    out = token_logprobs(h, w, t, torch.zeros(12, dtype=torch.bool), fused=fused)
    out.sum().backward()
    assert (out == 0).all() and (h.grad == 0).all() and (w.grad == 0).all()
    # [B, T, H] hidden with [B, T] targets/mask gives [B, T]
    mask = torch.rand(3, 4) > 0.5
    out = token_logprobs(h.view(3, 4, 8), w, t.view(3, 4), mask, fused=fused)
    torch.testing.assert_close(out, _reference_logprobs(h, w, t, mask.view(-1)).view(3, 4), atol=1e-5, rtol=1e-5)

@pytest.mark.parametrize("fused", FUSED)
def test_kernel_logprob_forward_only_equals_grad_path(fused):
    h, w, t, mask = _logprob_case(29, 16, 70, True, seed=1)
    with_grad = token_logprobs(h, w, t, mask, fused=fused)
    with torch.no_grad():
        no_grad = token_logprobs(h, w, t, mask, fused=fused)
    frozen = token_logprobs(h.detach(), w.detach(), t, mask, fused=fused)
    assert with_grad.requires_grad and not no_grad.requires_grad and not frozen.requires_grad
    assert torch.equal(with_grad.detach(), no_grad) and torch.equal(no_grad, frozen)

def test_kernel_logprob_twin_memory_is_chunked():
    from torch.utils._python_dispatch import TorchDispatchMode
    class LargestTensor(TorchDispatchMode):
        largest = 0
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for o in (out if isinstance(out, (tuple, list)) else [out]):
                if isinstance(o, torch.Tensor):
                    LargestTensor.largest = max(LargestTensor.largest, o.numel())
            return out
    N, H, V, chunk = 64, 8, 500, 4
    h, w, t, _ = _logprob_case(N, H, V, False)
    with LargestTensor():
        out = token_logprobs(h, w, t, fused=False, chunk_rows=chunk)
        out.sum().backward()
    # nothing bigger than one chunk of logits or the weight gradient; the full logits are N*V = 32000
    assert LargestTensor.largest <= max(chunk * V, V * H), LargestTensor.largest
    dh, dw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    unchunked = token_logprobs(h, w, t, fused=False, chunk_rows=N)
    unchunked.sum().backward()
    torch.testing.assert_close(out, unchunked, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(dh, h.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(dw, w.grad, atol=1e-6, rtol=1e-5)

def _dpo_case(B=3, T=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    policy = -torch.rand(2 * B, T, generator=g) * 3
    reference = -torch.rand(2 * B, T, generator=g) * 3
    mask = torch.rand(2 * B, T, generator=g) > 0.4
    mask[1] = False  # a chosen response with no tokens
    policy[~mask] = float("nan")  # masked positions must be ignored, not multiplied by 0
    return policy.requires_grad_(), reference, mask

@pytest.mark.parametrize("loss_type,eps,length_normalize",
                         [("sigmoid", 0.0, False), ("sigmoid", 0.2, False), ("ipo", 0.0, False), ("sigmoid", 0.0, True)])
def test_kernel_dpo_matches_twin_and_hand(loss_type, eps, length_normalize):
    if not _triton_runs:
        pytest.skip("Triton cannot run here (see FUSED)")
    beta = 0.5
    policy, reference, mask = _dpo_case()
    results = []
    for fused in (False, True):
        losses, policy_seq, reference_seq = dpo_losses(policy, reference, mask, beta, loss_type, eps, length_normalize, fused=fused)
        grad, = torch.autograd.grad((losses * torch.tensor([1.0, 2.0, 3.0])).sum(), policy)
        assert not policy_seq.requires_grad and not reference_seq.requires_grad
        results.append((losses, policy_seq, reference_seq, grad))
    for a, b in zip(*results):  # Triton vs twin, forward and backward
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    # by hand, in float64
    m = mask.double()
    average = loss_type == "ipo" or length_normalize
    def seq(x):
        s = (torch.nan_to_num(x.detach().double()) * m).sum(1)
        return s / m.sum(1).clamp(min=1) if average else s
    assert results[0][1][1] == 0 and torch.isfinite(results[0][0]).all()  # empty response: seq = 0
    ps, rs = seq(policy), seq(reference)
    z = (ps[:3] - ps[3:]) - (rs[:3] - rs[3:])
    if loss_type == "ipo":
        expected = (z - 1 / (2 * beta)) ** 2
    else:
        expected = -(1 - eps) * torch.log(torch.sigmoid(beta * z)) - eps * torch.log(torch.sigmoid(-beta * z))
    torch.testing.assert_close(results[1][0].double(), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(results[1][1].double(), ps, atol=1e-5, rtol=1e-5)
    # gradient by hand: d loss_b / d policy[i, t] = weight_b * dloss/dz * (+-1) * mask / count
    dz = 2 * (z - 1 / (2 * beta)) if loss_type == "ipo" else beta * (-(1 - eps) * torch.sigmoid(-beta * z) + eps * torch.sigmoid(beta * z))
    per_row = torch.cat([dz, -dz]) * torch.tensor([1.0, 2, 3, 1, 2, 3], dtype=torch.float64)
    if average:
        per_row = per_row / m.sum(1).clamp(min=1)
    torch.testing.assert_close(results[1][3].double(), per_row[:, None] * m, atol=1e-6, rtol=1e-5)

@pytest.mark.parametrize("fused", FUSED)
def test_kernel_dpo_policy_equals_reference_is_log2(fused):
    policy, _, mask = _dpo_case(seed=2)
    losses, _, _ = dpo_losses(policy, policy.detach().clone(), mask, 0.1, fused=fused)
    torch.testing.assert_close(losses, torch.full((3,), math.log(2)), atol=1e-6, rtol=0)
    losses, _, _ = dpo_losses(policy, policy.detach().clone(), mask, 0.1, "ipo", fused=fused)
    torch.testing.assert_close(losses, torch.full((3,), (1 / 0.2) ** 2), atol=1e-4, rtol=0)  # (0 - 1/(2 beta))^2
    with pytest.raises(ValueError):
        dpo_losses(policy, policy, mask, 0.1, "hinge", fused=fused)

@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("N,H,V", [(4096, 4096, 128256), (3000, 2048, 50257)])
def test_kernel_logprob_gpu_bf16(N, H, V):
    torch.manual_seed(0)
    h = torch.randn(N, H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(V, H, device="cuda") * 3.5 / H**0.5).bfloat16().requires_grad_()  # logit std ~3.5
    mask = torch.rand(N, device="cuda") > 0.4
    with torch.no_grad():
        t = torch.multinomial((h.float() @ w.float().T).softmax(-1), 1).squeeze(1)  # the model's own samples
    g = torch.randn(N, device="cuda")
    hf, wf = h.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    ref = _reference_logprobs(hf, wf, t, mask)
    (ref * g).sum().backward()
    for fused in (True, False):
        h.grad = w.grad = None
        out = token_logprobs(h, w, t, mask, fused=fused)
        (out * g).sum().backward()
        rel = lambda a, b: ((a.float() - b).norm() / b.norm()).item()
        # fused: fp32 logits from bf16 inputs, so only bf16 rounding of grad_logits and of the results;
        # the twin rounds the logits themselves to bf16 (like naive torch), hence looser bounds
        log_tol, grad_tol = (2e-3, 1e-2) if fused else (0.1, 3e-2)
        assert (out - ref).abs().max().item() < log_tol
        assert rel(h.grad, hf.grad) < grad_tol and rel(w.grad, wf.grad) < grad_tol, (rel(h.grad, hf.grad), rel(w.grad, wf.grad))
        with torch.no_grad():
            assert torch.equal(token_logprobs(h, w, t, mask, fused=fused), out.detach())

@gpu
@pytest.mark.gpu
def test_kernel_dpo_gpu_matches_twin():
    policy, reference, mask = _dpo_case(B=8, T=1500)
    policy = policy.detach().cuda().requires_grad_()
    outs = []
    for fused in (True, False):
        losses, ps, rs = dpo_losses(policy, reference.cuda(), mask.cuda(), 0.1, fused=fused)
        outs.append((losses, ps, rs, torch.autograd.grad(losses.sum(), policy)[0]))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)

# ---- selector ----
from selector import ObjectiveSelector


def test_selector_alright_fraction_matches_lambda():
    for lam in (0.25, 0.5, 0.8):
        sel = ObjectiveSelector(['sft', 'dpo'], [lam, 1 - lam], 'alright', 4000, seed=3)
        picks = [sel.choose(i)[0][0] for i in range(4000)]
        assert abs(picks.count('sft') / 4000 - lam) < 0.03
        assert all(sel.choose(i)[0][1] == 1.0 for i in range(3))


def test_selector_alright_same_choices_for_same_seed_and_resume():
    a = ObjectiveSelector(['sft', 'dpo'], [0.5, 0.5], 'alright', 100, seed=7)
    b = ObjectiveSelector(['sft', 'dpo'], [0.5, 0.5], 'alright', 100, seed=7)
    first = [a.choose(i) for i in range(10)]
    assert first == [b.choose(i) for i in range(10)]
    state = a.state_dict()
    rest = [a.choose(i) for i in range(10, 30)]
    c = ObjectiveSelector(['sft', 'dpo'], [0.5, 0.5], 'alright', 100, seed=999)
    c.load_state_dict(state)
    assert rest == [c.choose(i) for i in range(10, 30)]


def test_selector_sequential_budgets_and_mix():
    sel = ObjectiveSelector(['sft', 'dpo', 'kd'], [0.5, 0.3, 0.2], 'sequential', 10)
    assert [sel.choose(i)[0][0] for i in range(10)] == ['sft'] * 5 + ['dpo'] * 3 + ['kd'] * 2
    mix = ObjectiveSelector(['sft', 'dpo'], [0.25, 0.75], 'mix', 10)
    assert mix.choose(0) == [('sft', 0.25), ('dpo', 0.75)]


def test_selector_maxright_picks_larger_weighted_suboptimality():
    sel = ObjectiveSelector(['sft', 'dpo'], [0.25, 0.75], 'maxright', 100, optima=[1.0, 0.2], refresh_every=10)
    assert sel.needs_refresh(0) and sel.needs_refresh(20) and not sel.needs_refresh(5)
    sel.observe('sft', 3.0)   # 0.25 * (3.0 - 1.0) = 0.5
    sel.observe('dpo', 0.8)   # 0.75 * (0.8 - 0.2) = 0.45
    assert sel.choose(1) == [('sft', 1.0)]
    sel.observe('sft', 2.6)   # 0.4 < 0.45
    assert sel.choose(2) == [('dpo', 1.0)]


def test_selector_rejects_bad_weights():
    with pytest.raises(ValueError, match='summing to 1'):
        ObjectiveSelector(['sft', 'dpo'], [0.5, 0.6], 'alright', 10)
    with pytest.raises(ValueError, match='strategy'):
        ObjectiveSelector(['sft', 'dpo'], [0.5, 0.5], 'random', 10)


# ---- training ----

# ---- reliability ----

# Every reliability test runs bipost.py as a user would (a subprocess, tiny model, data/demo) and reads
# what it leaves on disk. Faults are injected from outside bipost.py: KILLER runs it under runpy after
# patching one stdlib/torch function to SIGKILL the process at a chosen point, so no test-only hook
# lives in production code and the kill point is deterministic (no timing races).
REL_TINY = ['--n_layer=1', '--n_embd=32', '--n_head=2', '--batch_size=4', '--eval_iters=2', '--warmup_iters=2']
KILLER = r'''
import builtins, io, os, runpy, signal, sys, torch
kind, pattern, nth = sys.argv[1], sys.argv[2], int(sys.argv[3])
sys.argv, calls = sys.argv[4:], []
def die():
    os.kill(os.getpid(), signal.SIGKILL)
if kind == 'print':  # killed right after the n-th log line starting with pattern: mid-training
    real_print = builtins.print
    def print(*args, **kwargs):
        real_print(*args, **kwargs)
        if args and str(args[0]).startswith(pattern) and len(calls.append(1) or calls) == nth:
            die()
    builtins.print = print
else:  # killed half-way through writing the n-th file whose path contains pattern: mid-save
    real_save = torch.save
    def save(obj, f, *args, **kwargs):
        if pattern in str(f) and len(calls.append(1) or calls) == nth:
            buffer = io.BytesIO()
            real_save(obj, buffer, *args, **kwargs)
            with open(f, 'wb') as out:
                out.write(buffer.getvalue()[:len(buffer.getvalue()) // 2])
            die()
        return real_save(obj, f, *args, **kwargs)
    torch.save = save
runpy.run_path(sys.argv[0], run_name='__main__')
'''


def _rel_run(out_dir, *args, kill=None, timeout=240):
    """bipost.py with the tiny model into out_dir; kill=(kind, pattern, nth) runs it under KILLER."""
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONWARNINGS': 'ignore'}
    env.pop('RANK', None)
    prefix = [sys.executable] + (['-c', KILLER, kill[0], kill[1], str(kill[2])] if kill else [])
    return subprocess.run(prefix + ['bipost.py', *REL_TINY, f'--out_dir={out_dir}', *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _rel_metrics(out_dir):
    """{('iter' or 'eval', n): record}, the last record per update wins (a resumed run logs again)."""
    records = {}
    with open(os.path.join(out_dir, 'metrics.jsonl')) as f:
        for line in f:
            record = json.loads(line)
            records[('iter' if 'objective' in record else 'eval', record['iter'])] = record
    return records


def _rel_losses(records):
    return {key: {k: v for k, v in r.items() if k.startswith(('train/', 'val/')) or k in ('objective', 'skipped')}
            for key, r in records.items()}


@pytest.fixture(scope='module')
def rel_uninterrupted(tmp_path_factory):
    """Per path ('plain' or 'deepspeed'): the metrics of 6 updates run without interruption (cached)."""
    runs = {}
    def get(path, *args):
        if path not in runs:
            out = tmp_path_factory.mktemp(f'full_{path}')
            done = _rel_run(out, '--max_iters=6', '--eval_interval=3', *args)
            assert done.returncode == 0, done.stderr[-2000:]
            runs[path] = _rel_losses(_rel_metrics(out))
        return runs[path]
    return get


@pytest.mark.parametrize('path, kill', [
    ('plain', ('print', 'iter 5 |', 1)),         # SIGKILL mid-training, after update 5
    ('plain', ('save', 'ckpt.pt.tmp', 2)),       # SIGKILL half-way through writing the update-6 checkpoint
    ('deepspeed', ('save', 'iter_0000006', 1)),  # ZeRO-2: SIGKILL half-way through the first shard of update 6
])
def test_reliability_killed_run_resumes_exactly(tmp_path, rel_uninterrupted, path, kill):
    args = ['--deepspeed=True', '--zero_stage=2'] if path == 'deepspeed' else []
    full = rel_uninterrupted(path, *args)
    killed = _rel_run(tmp_path, '--max_iters=6', '--eval_interval=3', *args, kill=kill)
    assert killed.returncode == -9, killed.stderr[-2000:]
    pointer = json.load(open(tmp_path / 'ckpt.json'))
    assert pointer['iter_num'] == 3  # the previous complete checkpoint, untouched by the kill
    if kill[0] == 'save' and path == 'plain':  # the half-written file is the temp one; ckpt.pt loads
        assert (tmp_path / 'ckpt.pt.tmp').exists()
        assert torch.load(tmp_path / 'ckpt.pt', weights_only=False)['iter_num'] == 3
    if path == 'deepspeed':
        assert pointer['tag'] == 'iter_0000003' and (tmp_path / 'ds' / 'iter_0000006').exists()
    resumed = _rel_run(tmp_path, '--max_iters=6', '--eval_interval=3', '--init_from=resume', *args)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert 'resumed from' in resumed.stdout and json.load(open(tmp_path / 'ckpt.json'))['iter_num'] == 6
    # same objective choices, data order, optimizer and RNG state: the per-update losses match exactly
    assert _rel_losses(_rel_metrics(tmp_path)) == full
    assert [k for k in full if k[0] == 'iter'] == [('iter', i) for i in range(1, 7)]
