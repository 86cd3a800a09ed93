import sys
sys.path.insert(0, "/tmp/mine")
from stage import stage
a='''- Bodies go through `router/http.py:parse_json` (orjson) and nowhere else: nested deeper than
  128 levels (serde_json's limit, which TGI's bodies meet), NaN or Infinity, a number past a
  double, a lone surrogate or invalid UTF-8 is a 400; an integer past 64 bits reads as a float
  (as serde_json's does), so an integer field refuses it with 422.'''
b='''- JSON a request carries (its body, a tool call's `arguments` string) is read by
  `router/json_limits.py:loads` (orjson) and nothing else: nested deeper than 128 levels
  (serde_json's limit, which TGI's bodies meet), NaN or Infinity, a number past a double, a
  lone surrogate or invalid UTF-8 makes a body a 400; an integer past 64 bits reads as a float
  (as serde_json's does), so an integer field refuses it with 422.'''
stage("DEVELOPERS.md", [(a, b)])
