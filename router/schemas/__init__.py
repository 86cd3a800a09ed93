"""Each API's bodies as typed models, declared once: parsing, 422s and /openapi.json come from
them. common: what they share; tgi, tgi_responses: TGI's routes; openai, openai_answers,
responses: OpenAI's chat, completions and Responses API."""
