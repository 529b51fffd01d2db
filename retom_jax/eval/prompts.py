"""The built-in prompt set of ``retom-jax eval``: class-name prompts in the style of the
ImageNet protocol of ToMe for SD (one prompt per class, several seeds per prompt), over
100 ImageNet-1k classes spread across its animals, objects, food and scenes."""
from __future__ import annotations

from pathlib import Path

TEMPLATE = "A high quality photograph of a {}."

CLASSES = (
    "goldfish", "great white shark", "tree frog", "loggerhead turtle", "green iguana",
    "chameleon", "king penguin", "flamingo", "bald eagle", "ostrich", "peacock",
    "toucan", "hummingbird", "jellyfish", "sea anemone", "snail", "lobster", "hermit crab",
    "golden retriever", "border collie", "siberian husky", "dalmatian", "pug",
    "german shepherd", "tabby cat", "siamese cat", "snow leopard", "lion", "tiger",
    "cheetah", "brown bear", "polar bear", "red fox", "arctic fox", "grey wolf",
    "meerkat", "hippopotamus", "zebra", "african elephant", "giant panda", "orangutan",
    "koala", "hedgehog", "porcupine", "beaver", "ladybug", "monarch butterfly",
    "dragonfly", "honeybee", "scorpion", "acoustic guitar", "grand piano", "violin",
    "accordion", "alarm clock", "analog clock", "backpack", "bicycle", "canoe",
    "castle", "cathedral", "lighthouse", "windmill", "suspension bridge", "steam locomotive",
    "school bus", "fire engine", "sports car", "convertible", "tractor", "airliner",
    "hot air balloon", "sailboat", "container ship", "mountain bike", "teapot",
    "coffee mug", "wine bottle", "umbrella", "lampshade", "rocking chair", "bookcase",
    "typewriter", "telescope", "camera", "pizza", "cheeseburger", "ice cream",
    "strawberry", "orange", "banana", "pineapple", "pomegranate", "broccoli",
    "mushroom", "volcano", "coral reef", "alpine lake", "sandbar", "valley",
)

assert len(CLASSES) == 100 and len(set(CLASSES)) == 100


def builtin_prompts() -> list[str]:
    return [TEMPLATE.format(c) for c in CLASSES]


def read_prompts(spec: str) -> list[str]:
    """``"builtin"``, or a text file with one prompt per line (blank lines and lines
    starting with ``#`` are skipped); ValueError with a one-line reason otherwise."""
    if spec == "builtin":
        return builtin_prompts()
    path = Path(spec).expanduser()
    if not path.is_file():
        raise ValueError(f"--prompts {spec!r}: no such file (give a text file with one "
                         f"prompt per line, or 'builtin')")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise ValueError(f"--prompts {spec!r} is not a UTF-8 text file") from None
    prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise ValueError(f"--prompts {spec!r} holds no prompt")
    return prompts
