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
    assert not any(r["completion"].startswith("The answer is") for r in splits["sft_train"])
    for name in ("pref_train", "pref_val"):  # half style pairs (verbose over the SFT answer), half correctness pairs
        style = [r["chosen"] == f"The answer is {answer[r['prompt']]}." and r["rejected"] == answer[r["prompt"]]
                 for r in splits[name]]
        right = [r["chosen"] == answer[r["prompt"]] != r["rejected"] for r in splits[name]]
        assert sum(style) == sum(right) == len(splits[name]) // 2 and not any(map(all, zip(style, right)))
    for name in ("sft", "pref"):
        clean, noisy, labels = splits[f"{name}_train"], splits[f"{name}_noisy_train"], corrupt[f"{name}_noisy_train"]
        assert labels.dtype == bool and labels.mean() == 0.25 and len(noisy) == len(clean)
        assert [a != b for a, b in zip(clean, noisy)] == labels.tolist()
        assert (np.load(tmp_path / f"{name}_noisy_train_corrupt.npy") == labels).all()

# ---- objectives ----

# ---- kernels ----

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
