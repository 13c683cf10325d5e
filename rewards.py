"""
Rewards for the RL objective (rl.py), plain functions with TRL's reward-function signature:

    scores = reward(prompts=[str, ...], completions=[str, ...], **columns)   # one float per completion

columns: every extra field of the prompt records (e.g. answer=[...]), one value per completion (a prompt's G
completions repeat its fields). The trainer multiplies the scores by rl_reward_scale (α).

Verifiers (Tulu 3's RLVR: score 1 for a verified answer, else 0, so that the reward is α or 0):
  verify_number  the completion's final answer equals the record's "answer" as a number: the last \\boxed{...},
                 else the text after the last "####", else the last number in the text; integers, decimals,
                 thousands commas, fractions a/b and \\frac{a}{b} compare exactly (1/2 = 0.5 = \\frac{1}{2})
  exact          the completion equals "answer" after stripping surrounding whitespace
  normalized     the same after case folding, collapsing whitespace and dropping a final . or !
  format         the stripped completion matches the record's "format", a Python regular expression, as a whole
  math           the completion's last \\boxed{...} (else its last math expression) equals "answer" as Hugging Face's
                 math-verify decides (sets, intervals, equations, √, π, units, percent; math_answers.py, optional:
                 pip install math-verify)
  ifeval         the completion follows every instruction of the record's "instruction_id_list" with its "kwargs"
                 (IFEval's strict, prompt-level check; ifeval_checks.py)
A reward model: a local HF directory with a sequence-classification head (AutoModelForSequenceClassification,
one label), which scores prompt + completion text as its own tokenizer reads it (RLHF).
A function of your own: 'module:function' (module importable from the working directory), same signature.
"""
import importlib
import json
import os
import re
import sys
from fractions import Fraction

NUMBER = r'-?\d[\d,]*(?:\.\d+)?(?:\s*/\s*\d+)?|-?\.\d+'


def parse_number(text):
    """A Fraction from '12', '-3.5', '1,000', '3/4', '\\frac{3}{4}', '$12$'; None if text is not one number."""
    text = text.strip().strip('$').strip()
    text = re.sub(r'^\\[dt]?frac\{(-?[\d.]+)\}\{(-?[\d.]+)\}$', r'\1/\2', text)
    if not re.fullmatch(NUMBER, text):
        return None
    try:
        value = Fraction(text.replace(',', '').replace(' ', ''))
    except (ValueError, ZeroDivisionError):
        return None
    return value


def final_answer(text):
    """The text of a completion's final answer: the last \\boxed{...} (braces nested), else what follows the last
    '####', else the last number; None when there is none."""
    start = text.rfind('\\boxed{')
    if start >= 0:
        depth, i = 1, start + len('\\boxed{')
        for j in range(i, len(text)):
            depth += {'{': 1, '}': -1}.get(text[j], 0)
            if depth == 0:
                return text[i:j]
        return None  # an unclosed box is malformed, not an answer
    if '####' in text:
        return text.rsplit('####', 1)[1].strip().split('\n')[0]
    numbers = re.findall(r'\\[dt]?frac\{-?[\d.]+\}\{-?[\d.]+\}|' + NUMBER, text)
    return numbers[-1] if numbers else None


def _field(values, key, spec):
    if values is None:
        raise ValueError(f'rl_reward={spec!r} needs an "{key}" field in every prompt record (data/prepare.py keeps the '
                         f'fields besides "prompt" in <split>_extra.jsonl)')
    return values


def _expected_number(answer):
    """The reference answer as a number: a number, or a text like '12', '#### 12' or '\\boxed{12}'."""
    text = str(answer)
    value = parse_number(text)
    if value is None and final_answer(text) is not None:
        value = parse_number(final_answer(text))
    return value


def verify_number(prompts, completions, answer=None, **columns):
    scores = []
    for completion, expected in zip(completions, _field(answer, 'answer', 'verify_number')):
        target, got = _expected_number(expected), final_answer(completion)
        scores.append(float(target is not None and got is not None and parse_number(got) == target))
    return scores


def exact(prompts, completions, answer=None, **columns):
    return [float(c.strip() == str(a).strip()) for c, a in zip(completions, _field(answer, 'answer', 'exact'))]


def _normalize(text):
    return re.sub(r'\s+', ' ', str(text)).strip().casefold().rstrip('.!').strip()


def normalized(prompts, completions, answer=None, **columns):
    return [float(_normalize(c) == _normalize(a)) for c, a in zip(completions, _field(answer, 'answer', 'normalized'))]


def matches_format(prompts, completions, format=None, **columns):
    return [float(re.fullmatch(pattern, c.strip(), re.DOTALL) is not None)
            for c, pattern in zip(completions, _field(format, 'format', 'format'))]


VERIFIERS = {'verify_number': verify_number, 'exact': exact, 'normalized': normalized, 'format': matches_format}


def _math():
    import math_answers
    return math_answers.MathVerifier()


def _ifeval():
    import ifeval_checks
    return ifeval_checks.follows_instructions


VERIFIER_MODULES = {'math': _math, 'ifeval': _ifeval}  # verifiers in a module of their own, imported when chosen


class RewardModel:
    """A sequence-classification model's first logit for prompt + completion, in batches, without grad."""

    def __init__(self, path, device):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
        self.torch, self.device = torch, device
        self.model = AutoModelForSequenceClassification.from_pretrained(path).to(device).eval().requires_grad_(False)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model.config.pad_token_id = self.tokenizer.pad_token_id  # which position is the last real token

    def __call__(self, prompts, completions, **columns):
        inputs = self.tokenizer([p + c for p, c in zip(prompts, completions)], return_tensors='pt', padding=True,
                                truncation=True).to(self.device)
        with self.torch.no_grad():
            return self.model(**inputs).logits[:, 0].float().tolist()


def load(spec, device='cpu'):
    """The reward function that config key rl_reward names; raises ValueError with the fix."""
    if spec in VERIFIERS:
        return VERIFIERS[spec]
    if spec in VERIFIER_MODULES:
        return VERIFIER_MODULES[spec]()
    if os.path.isdir(spec):
        if not os.path.exists(os.path.join(spec, 'config.json')):
            raise ValueError(f"rl_reward={spec!r} is a directory without config.json: pass a reward model written by "
                             f"save_pretrained (AutoModelForSequenceClassification)")
        with open(os.path.join(spec, 'config.json')) as f:
            config = json.load(f)
        architecture = (config.get('architectures') or ['a model of no named architecture'])[0]
        labels = len(config.get('id2label') or [0, 1])  # (transformers' default: 2)
        if not architecture.endswith('ForSequenceClassification') or labels != 1:
            # a causal LM would load with a new, random score layer: random rewards, and no error
            what = f"{architecture} with {labels} labels" if architecture.endswith('ForSequenceClassification') else architecture
            raise ValueError(f"rl_reward={spec!r} holds {what}, not a reward model (a "
                             f"sequence classifier with 1 label): pass the out_dir/hf of a run with objectives ['rm'] "
                             f"(out_dir/hf_rm beside another objective), or a reward model from TRL's RewardTrainer")
        return RewardModel(spec, device)
    if ':' in spec:
        module, name = spec.split(':', 1)
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        try:
            fn = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"rl_reward={spec!r}: cannot import {name} from module {module} ({e}); the module must be "
                             f"importable from the working directory") from None
        if not callable(fn):
            raise ValueError(f"rl_reward={spec!r}: {name} is not a function")
        return fn
    raise ValueError(f"rl_reward={spec!r} is not one of {sorted(VERIFIERS) + sorted(VERIFIER_MODULES)}, a local "
                     f"reward-model directory, or 'module:function'")


def decoder(meta):
    """ids -> text for the tokenizer the data was prepared with (meta.json), for the reward functions."""
    name = meta['tokenizer']
    if name == 'bipost-demo-bytes':  # data/prepare.py's demo encoding: ids 0-255 are the bytes
        return lambda ids: bytes(i for i in ids if i < 256).decode('utf-8', 'replace')
    if os.path.isdir(name):
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(name)
        return lambda ids: tokenizer.decode(ids, skip_special_tokens=True)
    import tiktoken
    encoding = tiktoken.get_encoding(name)
    return lambda ids: encoding.decode([i for i in ids if i < encoding.n_vocab])
