import sys
sys.path.insert(0, "/tmp/mine")
from stage import stage
reps=[
('''    "grammar": _nullable(
        {
            "type": "object",
            "description": (''','''    "grammar": _nullable(
        {
            "type": "object",
            "required": ["type"],
            "properties": {"type": _GRAMMAR_TYPE},
            "description": ('''),
('''                "response_format": _nullable(
                    {
                        "type": "object",
                        "description": (''','''                "response_format": _nullable(
                    {
                        "type": "object",
                        "required": ["type"],
                        "properties": {"type": _GRAMMAR_TYPE},
                        "description": ('''),
('''_PARAMETERS = {''','''# What validation takes as a grammar's or a response format's `type`.
_GRAMMAR_TYPE = {"type": "string", "enum": ["json", "regex", "json_schema", "json_object", "text"]}

_PARAMETERS = {'''),
('''            "properties": {"inputs": _PROMPT, "parameters": _ref("GenerateParameters")},''',
'''            "properties": {"inputs": _PROMPT, "parameters": _PARAMETERS_REF},'''),
('''                "inputs": _PROMPT,
                "parameters": _ref("GenerateParameters"),''','''                "inputs": _PROMPT,
                "parameters": _PARAMETERS_REF,'''),
('''_PROMPT = {"type": "string", "minLength": 1}''','''_PROMPT = {"type": "string", "minLength": 1}
# Shardline reads a null `parameters` as the defaults (TGI refuses it).
_PARAMETERS_REF = {"allOf": [_ref("GenerateParameters")], "nullable": True}'''),
]
stage("router/openapi.py", reps)
