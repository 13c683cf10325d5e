"""
Checkpoints that a kill at any moment cannot corrupt, and resumes that continue the run exactly as if it had never
stopped. bipost.py writes the files (save_checkpoint) and reads them back; this file holds the rules: which config
a resumed run has, and how a staged checkpoint is committed and published.
"""
import json
import os
import shutil

from configurator import configure, ConfigError

# Resuming continues the run in out_dir as if it had never stopped: the checkpoint's saved config is the starting
# point and the command line (files, --key=value) is applied over it. Only these keys may then differ from the saved
# values: they steer how far the run goes, what it evaluates, logs and saves, and where it runs. Every other key
# (dataset, splits, objectives, strategy, weights, beta, losses, data selection, model, batch sizes, seed, dtype,
# deepspeed, the lr schedule, ... and any key added later until it is listed here) would make the resumed run differ
# from an uninterrupted one and is refused. max_iters may change: what depends on the run's length (the cosine lr
# decay, sequential's shares) then follows the new max_iters from the resume point on; updates already taken stay.
RESUME_MAY_CHANGE = ['max_iters', 'eval_interval', 'eval_iters', 'log_interval', 'eval_only', 'always_save_checkpoint',
                     'export_hf', 'wandb_log', 'wandb_project', 'wandb_run_name', 'nonfinite', 'out_dir', 'init_from',
                     'overwrite', 'device', 'gradient_checkpointing']  # the same gradients, other memory


def resume_config(out_dir, defaults, argv):
    """The config of a resumed run: the checkpoint's, with argv applied over it; a change of a fixed key is refused."""
    pointer = os.path.join(out_dir, 'ckpt.json')
    if not os.path.exists(pointer):
        raise ConfigError(f"init_from='resume' but {pointer} does not exist: no complete checkpoint in out_dir={out_dir}; "
                          f"start the run without --init_from=resume")
    with open(pointer) as f:
        saved = json.load(f).get('config')
    if saved is None:
        raise ConfigError(f"{pointer} holds no saved config (an older bipost wrote it): resume it with that version")
    resumed = {**defaults, **{k: v for k, v in saved.items() if k in defaults and k not in ('out_dir', 'device')}}
    configure(resumed, argv, verbose=False)  # out_dir and device are this launch's: the run may have moved
    for key, value in resumed.items():
        if key not in RESUME_MAY_CHANGE and value != saved.get(key, defaults[key]):
            raise ConfigError(f"{key}={value!r} but the checkpoint in {out_dir} was trained with {key}="
                              f"{saved.get(key, defaults[key])!r}: a resumed run keeps its config; drop {key} from the "
                              f"command line and config file, or start a new run in another out_dir")
    return resumed


def write_json_atomic(path, obj):
    with open(path + '.tmp', 'w') as f:
        json.dump(obj, f, indent=1)
    os.replace(path + '.tmp', path)


# A checkpoint of update N is saved in three steps (bipost.py, save_checkpoint), so that a kill at any moment leaves either
# checkpoint N-1 or N, never a mix:
#   1. stage: its files, complete, into out_dir/stage-N/ (ckpt.pt or, under DeepSpeed, the shards in out_dir/ds/<tag>,
#      hf/, the data selector's weights/ranking/keep.npy). A kill here leaves N-1 as it was; the stage is dropped later.
#   2. commit: ckpt.json, written as ckpt.json.tmp and renamed over the old one, points at N and names the stage.
#      This rename is the one moment the checkpoint changes.
#   3. publish: each staged file is renamed to its place in out_dir, then the stage (and, under DeepSpeed, the shards
#      of other tags) is removed. A kill here leaves a committed stage partly published; the next start finishes it
#      (publish is idempotent) before anything reads the checkpoint.

def publish(out_dir, pointer):
    """Step 3 (also on startup, to finish one a kill interrupted); drops stages that were never committed."""
    stage = pointer.get('stage')
    if stage and os.path.isdir(os.path.join(out_dir, stage)):
        for name in sorted(os.listdir(os.path.join(out_dir, stage))):
            source, target = os.path.join(out_dir, stage, name), os.path.join(out_dir, name)
            if os.path.isdir(source):  # hf/: a directory cannot be renamed over another; move the old one aside
                shutil.rmtree(target + '.old', ignore_errors=True)
                if os.path.exists(target):
                    os.replace(target, target + '.old')
                os.replace(source, target)
                shutil.rmtree(target + '.old', ignore_errors=True)
            else:
                os.replace(source, target)
    for name in os.listdir(out_dir):  # stages never committed; an old hf/ a kill left aside
        if name.startswith('stage-') or name.endswith('.old'):
            shutil.rmtree(os.path.join(out_dir, name))
    for tag in os.listdir(os.path.join(out_dir, 'ds')) if 'tag' in pointer else []:  # DeepSpeed: older checkpoints
        if tag.startswith('iter_') and tag != pointer['tag']:  # (ds/ also holds DeepSpeed's zero_to_fp32.py)
            shutil.rmtree(os.path.join(out_dir, 'ds', tag))
