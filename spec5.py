import sys, subprocess
sys.path.insert(0, "/tmp/mine")
from stage import stage
exec(open("/tmp/mine/spec4.py").read().split("stage(\"router/openapi.py\", reps)")[0].split("from stage import stage",1)[1])
reps.append(('''    "max_new_tokens": _nullable({"type": "integer", "format": "int32", "minimum": 0}),''','''    "max_new_tokens": _nullable({"type": "integer", "format": "int32", "minimum": 1}),'''))
stage("router/openapi.py", reps)
work = open("DEVELOPERS.md").read()
section = work[work.index("## The HTTP edge"):work.index("## Working on the GPU")]
stage("DEVELOPERS.md", [("## Working on the GPU", section + "## Working on the GPU")])
