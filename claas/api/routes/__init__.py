"""The API's routers, one per feature; `claas.api.app.create_app` includes them all."""
