"""Commit only my changes: whole files from the working tree, or HEAD + my (old, new) edits.

usage: commit.py MESSAGE SPEC.json ; SPEC = {"whole": [paths], "edits": {path: [[old, new], ...]}}
Uses a private index, then points the shared index's entries for these paths at the new blobs.
"""
import json, os, subprocess, sys, tempfile

def git(*args, env=None, input=None):
    return subprocess.run(["git", *args], check=True, capture_output=True, text=True,
                          env=env, input=input).stdout.strip()

message, spec = sys.argv[1], json.load(open(sys.argv[2]))
head = git("rev-parse", "HEAD")
blobs = {}
for path in spec.get("whole", []):
    blobs[path] = git("hash-object", "-w", path)
for path, edits in spec.get("edits", {}).items():
    raw = subprocess.run(["git", "show", f"{head}:{path}"], capture_output=True, text=True).stdout
    content = raw
    for old, new in edits:
        if content.count(old) != 1:
            sys.exit(f"{path}: edit not found once in HEAD: {old[:80]!r}")
        content = content.replace(old, new)
    blobs[path] = git("hash-object", "-w", "--stdin", input=content)
index = tempfile.mktemp()
env = {**os.environ, "GIT_INDEX_FILE": index}
git("read-tree", head, env=env)
for path, blob in blobs.items():
    git("update-index", "--add", "--cacheinfo", f"100644,{blob},{path}", env=env)
tree = git("write-tree", env=env)
commit = git("commit-tree", tree, "-p", head, "-m", message)
git("update-ref", "HEAD", commit, head)  # fails if someone committed meanwhile: rerun
for path, blob in blobs.items():
    git("update-index", "--add", "--cacheinfo", f"100644,{blob},{path}")
os.unlink(index)
print(commit, git("log", "--oneline", "-1"))
