import sys
sys.path.insert(0, "/tmp/mine")
from stage import stage
work = open("router/openapi.py").read()
new_errors = work[work.index("_REQUEST_ERRORS = {"):work.index("def _post(")]
reps = [
('''def _errors(media_type: str = "application/json") -> dict[str, Any]:
    described = {
        "422": "Input validation error",
        "424": "Generation error",
        "429": "Model is overloaded",
        "500": "Incomplete generation",
    }
    return {
        code: {"description": text, "content": {media_type: {"schema": _ref("ErrorResponse")}}}
        for code, text in described.items()
    }


''', new_errors),
('''            "required": ["inputs"],
            "properties": {"inputs": {"type": "string"}, "parameters": _ref("GenerateParameters")},''',
'''            "required": ["inputs"],
            "properties": {"inputs": _PROMPT, "parameters": _ref("GenerateParameters")},'''),
('''            "required": ["inputs"],
            "properties": {
                "inputs": {"type": "string"},''','''            "required": ["inputs"],
            "properties": {
                "inputs": _PROMPT,'''),
('''def _schemas() -> dict[str, Any]:''','''_PROMPT = {"type": "string", "minLength": 1}


def _schemas() -> dict[str, Any]:'''),
('''                    "responses": {
                        "200": {
                            "description": "Token ids with their character spans",
                            "content": {"application/json": {"schema": _ref("TokenizeResponse")}},
                        }
                    },''','''                    "responses": {
                        "200": {
                            "description": "Token ids with their character spans",
                            "content": {"application/json": {"schema": _ref("TokenizeResponse")}},
                        },
                        **_error_responses(_REQUEST_ERRORS, "application/json"),
                    },'''),
('''                        "content": {"application/json": {"schema": _ref("ChatTokenizeResponse")}},
                    },
                    "422": _errors()["422"],''','''                        "content": {"application/json": {"schema": _ref("ChatTokenizeResponse")}},
                    },
                    **_error_responses(_REQUEST_ERRORS, "application/json"),'''),
('''                        "role": {"type": "string"},
                        "name": _nullable({"type": "string"}),''','''                        "role": {"type": "string", "minLength": 1},
                        "name": _nullable({"type": "string"}),'''),
]
stage("router/openapi.py", reps)
