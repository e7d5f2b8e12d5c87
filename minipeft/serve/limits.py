"""What one caller may ask of `minipeft serve`, each bound a flag with a safe default. Anything beyond a bound
is refused alone with a 4xx in OpenAI's error shape; nothing a request carries reaches the engine unchecked.

    bytes ─► body ≤ --max-body          connections ≤ --max-connections, each idle ≤ --timeout seconds
    JSON  ─► prompts × n ≤ --max-prompts, each ≤ --max-prompt-tokens; stop: ≤ 4 strings ≤ --max-stop-chars
             seed in [0, 2^63); tune: ≤ --max-tune-examples, each text ≤ --max-tune-chars
    queue ─► ≤ --max-waiting rows waiting (≥ 1); a request that could never fit is a 400, not a 503
    engine ─► one prefill forward holds ≤ --max-prefill-tokens (rows × longest prompt), one row at least
"""

from dataclasses import dataclass, fields

from ..errors import BadInput

SEED_LIMIT = 2 ** 63  # torch.Generator.manual_seed takes less than 2^64; one range for every device
MAX_STOP_STRINGS = 4  # OpenAI's own bound


@dataclass
class Limits:
    max_body: int = 4 * 2 ** 20
    max_connections: int = 64
    timeout: float = 30.0
    max_prompts: int = 16
    max_prompt_tokens: int = 4096
    max_stop_chars: int = 256
    max_tune_examples: int = 256
    max_tune_chars: int = 4096
    max_prefill_tokens: int = 8192

    HELP = {"max_body": "bytes in a request's body", "max_connections": "open connections; more are refused "
            "with a 503", "timeout": "seconds a request may take to arrive, however slowly "
            "it trickles; and a connection may stay idle or unread", "max_prompts": "rows one request "
            "may ask for (prompts x n)", "max_prompt_tokens": "tokens in one prompt", "max_stop_chars":
            "characters in one stop string", "max_tune_examples": "examples in one /api/tune",
            "max_tune_chars": "characters of one example's prompt or completion", "max_prefill_tokens":
            "tokens one prefill forward holds (rows x longest prompt); a longer queue is prefilled in turns"}

    @classmethod
    def add_arguments(cls, parser):
        for f in fields(cls):
            parser.add_argument("--" + f.name.replace("_", "-"), type=f.type,
                                default=f.default, help=f"{cls.HELP[f.name]} (default: %(default)s)")

    @classmethod
    def from_args(cls, args) -> "Limits":
        limits = cls(**{f.name: getattr(args, f.name, f.default) for f in fields(cls)})
        for f in fields(cls):
            if not getattr(limits, f.name) > 0:
                raise BadInput(f"--{f.name.replace('_', '-')} must be above 0, got {getattr(limits, f.name)}")
        return limits
