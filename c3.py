import json, re, subprocess
work = open("launcher/args.py").read()
def between(start, end):
    """The working tree's text from `start` up to (not including) `end`."""
    i = work.index(start); j = work.index(end, i)
    return work[i:j]
edits = []
edits.append(['''from collections.abc import Callable, Mapping
''', '''import sys
from collections.abc import Callable, Mapping, Sequence
'''])
edits.append(['''_FALSE = {"0", "false", "no", "off", ""}
''', '''_FALSE = {"0", "false", "no", "off", ""}
_NOT_YET = "not supported yet: "
_NO_NGROK = "not supported: Shardline opens no tunnels; run an ngrok agent in front of its port"
'''])
edits.append(['''    switch: bool = False  # present = true, as TGI's `--json-output`

    @property
    def dest(self) -> str:
        long_name = next(name for name in self.names if name.startswith("--"))
        return long_name.removeprefix("--").replace("-", "_")
''', between("    switch: bool = False", "\n\nFLAGS")])
# flag blocks: anchor line -> working tree block following it
for anchor, stop in [
    ('''         "accepted for TGI compatibility: Shardline runs its own model code only", switch=True),
''', "    # shards\n"),
    ('''         "e.g. 1,2,4,8; 0 disables"),
''', "    # router\n"),
    ('''         "from the model and the KV cache", type=int),
''', '''    Flag(("--max-total-tokens",)'''),
    ('''         "folder with the tokenizer files, when not the model's"),
''', '''    Flag(("--shard-step-timeout",)'''),
    ('''    Flag(("--json-output",), "JSON_OUTPUT", "logs as JSON lines", switch=True),
''', ")  # fmt: skip"),
]:
    block = between(anchor, stop)
    if "--disable-grammar-support" in block:  # the grammar engineer's flags, not mine
        i = block.index('    Flag(("--disable-grammar-support",)')
        j = block.index('    Flag(("--enable-prefill-logprobs",)')
        block = block[:i] + block[j:]
    edits.append([anchor, block])
edits.append(['''        dest=flag.dest,
        type=flag.type,
''', '''        dest=flag.dest,
        action=_Repeated if flag.repeated else "store",
        type=flag.type,
'''])
edits.append(['''def _env_default(parser''', between("class _Repeated", "def _env_default(parser") + '''def _env_default(parser'''])
edits.append(['''    try:
        value = convert(raw)
''', '''    try:
        if flag.repeated:
            return [convert(item.strip()) for item in raw.split(",") if item.strip()]
        value = convert(raw)
'''])
edits.append(['''    args = parser.parse_args(argv)
    try:
        args.num_shard = resolve_num_shard(args.sharded, args.num_shard, environ)
    except ValueError as error:
        parser.error(str(error))
    return args
''', between("    args = parser.parse_args(argv)\n", "\n\ndef resolve_num_shard")])
spec = json.load(open("/tmp/mine/c4.json")) if False else {"edits": {"launcher/args.py": edits}}
json.dump(spec, open("/tmp/mine/c3.json", "w"))
head = subprocess.run(["git", "show", "HEAD:launcher/args.py"], capture_output=True, text=True).stdout
for old, new in edits:
    assert head.count(old) == 1, old
    head = head.replace(old, new)
open("/tmp/mine/args_head_mine.py", "w").write(head)
