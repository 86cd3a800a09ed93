"""Stage HEAD:<file> plus only my replacements (old -> new), leaving the worktree alone."""
import subprocess, sys, json

def stage(path, reps):
    head = subprocess.run(["git", "show", f"HEAD:{path}"], capture_output=True, text=True, check=True).stdout
    for old, new in reps:
        assert head.count(old) == 1, (path, old[:80], head.count(old))
        head = head.replace(old, new)
    blob = subprocess.run(["git", "hash-object", "-w", "--stdin"], input=head, capture_output=True, text=True, check=True).stdout.strip()
    mode = "100644"
    subprocess.run(["git", "update-index", "--cacheinfo", f"{mode},{blob},{path}"], check=True)
    return head

if __name__ == "__main__":
    spec = json.load(open(sys.argv[1]))
    for path, reps in spec.items():
        stage(path, reps)
