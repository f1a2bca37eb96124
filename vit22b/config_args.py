"""Parse the text after ':' in `--config=configs/FILE.py:ARGS` into typed keys.

`parse_arg("variant=B/16,batch=256", variant="22B/14", batch=65536, runlocal=False)` gives
ConfigDict(variant='B/16', batch=256, runlocal=False): each key's type comes from its default. A bare word
is a boolean flag (`runlocal`), and a bare value sets the first key.
"""
import ml_collections


def _convert(key, text, default):
    if isinstance(default, bool):
        if text.lower() in ("1", "true", "yes", ""):
            return True
        if text.lower() in ("0", "false", "no"):
            return False
        raise ValueError(f"config arg {key}: expected a boolean, got {text!r}")
    try:
        return type(default)(text) if default is not None else text
    except ValueError:
        raise ValueError(f"config arg {key}: expected {type(default).__name__}, got {text!r}") from None


def parse_arg(arg, **defaults):
    out = ml_collections.ConfigDict(dict(defaults))
    if not arg:
        return out
    keys = list(defaults)
    for i, part in enumerate(p for p in arg.split(",") if p):
        key, eq, value = part.partition("=")
        if not eq:
            if key in defaults and isinstance(defaults[key], bool):
                out[key] = True
                continue
            if i == 0 and keys:
                key, value = keys[0], part
            else:
                raise ValueError(f"config arg {part!r}: expected KEY=VALUE; known keys: {keys}")
        if key not in defaults:
            raise ValueError(f"config arg {key!r}: unknown key; known keys: {keys}")
        out[key] = _convert(key, value, defaults[key])
    return out


def load_config(spec):
    """'configs/FILE.py[:ARGS]' -> get_config(ARGS), as `--config=` does (for notebooks and tests)."""
    import importlib.util
    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("vit22b_config", path)
    if module_spec is None:
        raise FileNotFoundError(f"config file {path!r} not found")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)
