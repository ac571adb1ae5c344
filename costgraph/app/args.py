"""Command-line arguments shared by the commands, and how they become model inputs."""
from __future__ import annotations

import argparse

from costgraph.dtypes import DEFAULT_STORAGE, STORAGE
from costgraph.hardware import names as hardware_names
from .models import DEFAULT_MODEL, MODELS, get_model
from .text import UserError, parse_size, split_list


class Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse would print usage + message; we want one line
        raise UserError(message)


def model_arg(q, top: bool = False) -> None:
    q.add_argument("--model", default=DEFAULT_MODEL if top else argparse.SUPPRESS,
                   help=f"one of {', '.join(MODELS)} (default: %(default)s)" if top else argparse.SUPPRESS)


def mode_arg(q, default=None) -> None:
    q.add_argument("--mode", default=default, help="a mode of the model (default: the model's, e.g. gundam)")


def _max_num(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise UserError(f"--max-num must be an integer, got {text!r}") from None
    if not 2 <= n <= 64:  # the vendor's candidate grids start at 2 tiles (min_num)
        raise UserError(f"--max-num must be from 2 (the vendor's min_num) to 64, got {n}")
    return n


def max_num_arg(q) -> None:
    q.add_argument("--max-num", type=_max_num, default=None,
                   help="most crops (default: the model's: DeepSeek-OCR 9 (HF; vLLM 6), DeepSeek-OCR 2 6; 2 to 64)")


def max_num_option(args) -> dict:
    """`max_num` for a model's inputs when given (else each model's own default applies)."""
    n = getattr(args, "max_num", None)
    return {} if n is None else {"max_num": n}


def variant_args(q) -> None:
    """Every model's variant options (a model ignores the ones it does not have; an option several models
    have takes any model's choices, and the chosen model's variants refuse the others in one line)."""
    options, choices = {}, {}
    for m in MODELS.values():
        for o in m.variant_options:
            options.setdefault(o.name, o)
            choices.setdefault(o.name, [])
            choices[o.name] += [c for c in o.choices if c not in choices[o.name]]
    for name, o in options.items():
        if o.choices:
            q.add_argument(f"--{o.name.replace('_', '-')}", choices=choices[name], default=None,
                           help=f"{o.help} (default: {o.default})")
        else:
            q.add_argument(f"--{o.name.replace('_', '-')}", type=_parsed(o), default=None,
                           help=f"{o.help} (default: {o.default})")


def _parsed(option):
    """An argparse type for a free-valued variant option: its parser, a bad value one clear line."""
    def parse(text: str):
        try:
            return option.parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--{option.name.replace('_', '-')}: not a valid value: {text!r}") \
                from None
    return parse


def dtype_arg(q) -> None:
    q.add_argument("--dtype", choices=list(STORAGE), default=DEFAULT_STORAGE,
                   help="storage dtype of weights and activations (default: %(default)s)")


def sequence_args(q) -> None:
    q.add_argument("--text-tokens", type=int, default=None,
                   help="prompt text after the image (default: the model's, 10 for DeepSeek-OCR: an estimate "
                        "of the OCR prompt)")
    q.add_argument("--output-tokens", type=int, default=None,
                   help="generated tokens, >= 1: the prefill yields the first (default: the model's, 1000)")
    q.add_argument("--batch", type=int, default=None,
                   help="pages per micro-batch of a training step (--phase train; default 1)")


def output_text_tokens_arg(q) -> None:
    q.add_argument("--output-text-tokens", type=int, default=None, metavar="N",
                   help="tokens of the page's OCR text: adds compression_ratio = N / valid_tokens (the vendor's "
                        "int rule), as the vendor's test_compress prints it (DeepSeek-OCR; default: none)")


def input_options(args) -> dict:
    """Options of the model's input beyond its size and sequence (given ones only)."""
    n = getattr(args, "output_text_tokens", None)
    return {} if n is None else {"output_text_tokens": n}


def page_args(q) -> None:
    """One input (by size, image or grid) and what the language model runs for it."""
    mode_arg(q)
    g = q.add_mutually_exclusive_group(required=True)
    g.add_argument("--size", type=parse_size, metavar="WxH")
    g.add_argument("--image", metavar="PATH")
    g.add_argument("--grid", type=parse_size, metavar="AxB", help="crop grid directly (1x1: no crops)")
    q.add_argument("--what-if", action="store_true",
                   help="accept a --grid the layout cannot produce under --max-num (labelled what-if)")
    max_num_arg(q)
    sequence_args(q)
    output_text_tokens_arg(q)
    variant_args(q)


def hardware_arg(q) -> None:
    q.add_argument("--hardware", default=None, metavar="NAME[,NAME...]",
                   help=f"roofline latency and memory fit on {', '.join(hardware_names())} or all "
                        "(this-machine: a short calibration now)")


# ---- turning arguments into model inputs ---------------------------------------------------

def model_of(args):
    return get_model(getattr(args, "model", None))


def mode_of(model, args, allow_none: bool = False):
    name = getattr(args, "mode", None)
    if name is None:
        return None if allow_none else model.get_mode(model.default_mode)
    return model.get_mode(name)


def variants_of(model, args):
    """The model's variants from the options it has; an option it does not have is refused if given."""
    given = {o.name: getattr(args, o.name) for m in MODELS.values() for o in m.variant_options
             if getattr(args, o.name, None) is not None}
    own = {o.name for o in model.variant_options}
    foreign = [k for k in given if k not in own]
    if foreign:
        raise UserError(f"--{foreign[0].replace('_', '-')} does not apply to {model.name}")
    return model.variants(**given)


def sequence_of(model, args) -> dict:
    seq = dict(model.default_sequence())
    training = getattr(args, "phase", None) == "train"
    if training and getattr(args, "output_tokens", None) is not None:
        raise UserError("--output-tokens applies to --phase inference (a training step generates nothing: its "
                        "sequence is the prompt and the answer, --text-tokens)")
    if getattr(args, "batch", None) is not None and not training:
        raise UserError("--batch applies to --phase train")
    if training and seq:
        seq["output_tokens"] = 1
    for k in ("text_tokens", "output_tokens", "batch"):
        v = getattr(args, k, None)
        if v is not None:
            if not seq:
                raise UserError(f"--{k.replace('_', '-')} applies to models with a language model, "
                                f"not {model.name}")
            seq[k] = v
    return seq


def point_of(model, mode, args):
    return model.point(mode, size=args.size, image=args.image, grid=args.grid, **max_num_option(args),
                       what_if=args.what_if, **sequence_of(model, args), **input_options(args))


def scopes_of(model, mode, args, variants=None) -> tuple[str, ...]:
    """--scope is repeatable and takes comma lists; default: every scope of the mode (and phase)."""
    allowed = model.scopes(mode, variants)
    if not args.scope:
        return allowed
    scopes = split_list(args.scope, "scope")
    bad = [s for s in scopes if s not in allowed]
    if bad:
        raise UserError(f"unknown scope {bad[0]!r} for mode {mode.name} (choose from {', '.join(allowed)})")
    return model.expand_scopes(scopes)


