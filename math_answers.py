"""
rl_reward = 'math': a completion's final answer checked against the record's "answer" as Hugging Face's math-verify
checks it (an optional extra: pip install math-verify), in a worker process so that no expression can stall a rollout.

What is compared:
  the completion  its last \\boxed{...} (or \\fbox{...}), braces nested; a box that never closes is malformed and
                  scores 0 (no fallback to earlier text: a truncated answer is no answer). Without a box, the whole
                  completion goes to math-verify, which takes its last math expression ("the final answer is ..."
                  and other anchors first, then the rightmost LaTeX or plain expression).
  the gold        a bare answer ('72', '\\frac{1}{2}', '(1,2]', '\\text{(B)}'), a GSM8K solution ('... #### 72': the
                  text after the last ####, thousands commas dropped) or a MATH solution (its last \\boxed{...}).
math-verify parses both sides (LaTeX and plain), then compares them as numbers (to 6 decimals), sets, tuples,
intervals, matrices, equations (x = 5 against 5), inequalities, symbolic expressions (2\\sqrt{3} = \\sqrt{12}), with
units, degrees, percent and \\text{} normalized away; a string that does not parse compares as a string.

Why a worker process: math-verify bounds each parse and comparison with signal.alarm, which works only in the main
thread of a process (in any other thread it raises ValueError) and cannot stop a call stuck inside C code. The worker
is that main thread, and the trainer kills and restarts it when one completion takes longer than 3 × seconds
(parse the gold, parse the answer, compare): that completion scores 0, the next one is checked by a fresh worker.
"""
import importlib.util
import json
import os
import select
import subprocess
import sys

MALFORMED = object()  # a box that opens and never closes


def last_boxed(text):
    """The content of the last \\boxed{...} or \\fbox{...} (braces nested), None when there is no box, MALFORMED
    when the last one never closes."""
    start = max(text.rfind('\\boxed{'), text.rfind('\\fbox{'))
    if start < 0:
        return None
    depth = 0
    for j in range(text.index('{', start), len(text)):
        depth += {'{': 1, '}': -1}.get(text[j], 0)
        if depth == 0:
            return text[text.index('{', start) + 1:j]
    return MALFORMED


def gold_answer(answer):
    """The answer in a record's "answer" field: a bare answer, the part after a GSM8K solution's last '####', or a
    MATH solution's last \\boxed{...}."""
    text = str(answer).strip()
    if '####' in text:
        return text.rsplit('####', 1)[1].strip().split('\n')[0].replace(',', '')
    boxed = last_boxed(text)
    if isinstance(boxed, str):
        return boxed
    return text.strip('$').strip()


def completion_text(completion):
    """What math-verify reads from a completion: its last box alone, or the whole text; None for a malformed box."""
    boxed = last_boxed(completion)
    if boxed is MALFORMED:
        return None
    return completion if boxed is None else '\\boxed{' + boxed + '}'


def check(gold, prediction, seconds):
    """math-verify's verdict for a gold answer and a prediction text (what completion_text returns); in the worker."""
    from math_verify import parse, verify
    return bool(verify(parse('$' + gold + '$', parsing_timeout=seconds), parse(prediction, parsing_timeout=seconds),
                       timeout_seconds=seconds))


def serve(seconds):
    """The worker's loop: one JSON [gold, prediction] per line in, one JSON verdict per line out."""
    import logging
    logging.getLogger('math_verify').setLevel(logging.ERROR)  # its timeout warnings would flood the trainer's log
    import math_verify  # noqa: F401 -- imported before 'ready', so that the first completion's clock is fair
    print('ready', flush=True)
    for line in sys.stdin:
        gold, prediction = json.loads(line)
        print(json.dumps(check(gold, prediction, seconds)), flush=True)


class MathVerifier:
    """The 'math' reward: score 1 when the completion's final answer equals the record's "answer", else 0."""

    def __init__(self, seconds=5):
        self.worker = None
        if importlib.util.find_spec('math_verify') is None:
            raise ValueError("rl_reward='math' needs Hugging Face's math-verify: pip install 'math-verify>=0.9'")
        self.seconds = int(seconds)

    def _start(self):
        self.worker = subprocess.Popen([sys.executable, os.path.abspath(__file__), str(self.seconds)],
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        if self._read(120) != 'ready':  # sympy's import alone takes seconds on a busy machine
            self.close()
            raise RuntimeError('math_answers.py: the math-verify worker did not start; run '
                               '`python math_answers.py 5` to see its error')

    def _read(self, seconds):
        ready, _, _ = select.select([self.worker.stdout], [], [], seconds)
        return self.worker.stdout.readline().strip() if ready else None

    def verdict(self, gold, completion):
        prediction = completion_text(completion)
        if prediction is None:
            return False
        if self.worker is None or self.worker.poll() is not None:
            self._start()
        self.worker.stdin.write(json.dumps([gold_answer(gold), prediction]) + '\n')
        line = self._read(3 * self.seconds)
        if line is None:  # stuck where math-verify's own alarm cannot reach: a fresh worker for the next one
            self.close()
            return False
        return json.loads(line)

    def __call__(self, prompts, completions, answer=None, **columns):
        if answer is None:
            raise ValueError('rl_reward=\'math\' needs an "answer" field in every prompt record (data/prepare.py keeps '
                             'the fields besides "prompt" in <split>_extra.jsonl)')
        return [float(self.verdict(gold, completion)) for completion, gold in zip(completions, answer)]

    def close(self):
        if self.worker is not None:
            self.worker.kill()
            self.worker.wait()
            self.worker = None

    __del__ = close


if __name__ == '__main__':
    serve(int(sys.argv[1]))
