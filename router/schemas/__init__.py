"""Each API's request (and response) bodies as typed models, declared once: parsing, 422s and
/openapi.json come from them. common: what they share; tgi: TGI's routes; openai: OpenAI's."""
