"""
Poor man's configurator, after nanoGPT. bipost.py calls configure(globals(), sys.argv[1:]):

    python bipost.py config/demo.py --batch_size=4 --strategy=mix --weights="[0.3, 0.7]"

Each argument without a leading '--' is a Python file exec'd over the config (a recipe assigns
globals). Each --key=value overrides one key: the value goes through ast.literal_eval (a bare word
that is not a Python literal stays a string) and must have the type of the default. Unknown keys,
in a file or on the command line, are an error: a typo must cost seconds, not a night.
"""
import ast
import difflib
import os
import types


class ConfigError(Exception):
    pass


def _typed(key, value, default, where):
    if default is None or value is None and isinstance(default, str):
        return value
    if isinstance(default, float) and type(value) is int:
        return float(value)  # --learning_rate=1 means 1.0
    if isinstance(default, (list, tuple)) and isinstance(value, (list, tuple)):
        return type(default)(value)
    if type(value) is not type(default):
        raise ConfigError(f"{where}: {key} must be {type(default).__name__} like its default {default!r}, "
                          f"got {type(value).__name__} {value!r}")
    return value


def _unknown(key, config, where):
    close = difflib.get_close_matches(key, list(config), n=1)
    hint = f" Did you mean '{close[0]}'?" if close else " The known keys are the globals at the top of bipost.py."
    return ConfigError(f"{where}: unknown config key '{key}'.{hint}")


def configure(config, argv, verbose=True):
    """Apply config files and --key=value overrides to the dict `config` in place; return {key: value} changed."""
    changed = {}
    for arg in argv:
        if not arg.startswith('--'):
            if not os.path.isfile(arg):
                raise ConfigError(f"{arg}: config file not found (arguments without '--' are config files; "
                                  f"overrides look like --key=value)")
            scope = dict(config)
            with open(arg) as f:
                exec(compile(f.read(), arg, 'exec'), scope)
            for key, value in scope.items():
                if key.startswith('_') or isinstance(value, (types.ModuleType, types.FunctionType, type)):
                    continue
                if key not in config:
                    raise _unknown(key, config, arg)
                if value is not config[key] and value != config[key]:
                    changed[key] = config[key] = _typed(key, value, config[key], arg)
        else:
            key, eq, text = arg[2:].partition('=')  # only the first '=' splits: --x="a=b" keeps "a=b"
            if not eq:
                hint = f" (--{key}=True)" if isinstance(config.get(key), bool) else ''
                raise ConfigError(f"{arg}: expected --key=value{hint}")
            if key not in config:
                raise _unknown(key, config, arg)
            try:
                value = ast.literal_eval(text)
            except (SyntaxError, ValueError):
                value = text
            changed[key] = config[key] = _typed(key, value, config[key], arg)
    if verbose and os.environ.get('RANK', '0') == '0':
        for key, value in changed.items():
            print(f"overriding: {key} = {value!r}")
    return changed
