"""
The API's own documentation: the OpenAPI document and Swagger UI.

Swagger UI is served from the packaged ``swagger-ui-bundle-v2`` files, with
no CDN, because gateways are often installed offline.
"""

from __future__ import annotations

import orjson
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource
from twisted.web.static import Data, File

from oproxy.errors import NotFound
from oproxy.openapi import openapi_document
from oproxy.web.dialects import OPENAI

OPENAPI_JSON = orjson.dumps(openapi_document())

SWAGGER_PAGE = b"""<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>oproxy API</title>
  <link rel="stylesheet" href="/docs/swagger-ui.css">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="/docs/swagger-ui-bundle.js"></script>
  <script src="/docs/swagger-ui-standalone-preset.js"></script>
  <script src="/docs/oproxy-init.js"></script>
</body>
</html>
"""

SWAGGER_INIT = b"""window.onload = function () {
  window.ui = SwaggerUIBundle({
    url: "/openapi.json",
    dom_id: "#swagger-ui",
    presets: [SwaggerUIBundle.presets.apis, SwaggerUIStandalonePreset],
    layout: "StandaloneLayout",
  });
};
"""


def swagger_ui_files() -> IResource:
    """Swagger UI's files, plus the script that points it at our document."""
    from swagger_ui_bundle import swagger_ui_path  # type: ignore[import-untyped]

    files = File(str(swagger_ui_path))
    files.childNotFound = _JSONNotFound()  # type: ignore[assignment,no-untyped-call]
    files.putChild(b"oproxy-init.js", Data(SWAGGER_INIT, "text/javascript"))
    return files


class _JSONNotFound(Resource):
    """A missing documentation asset: a JSON 404 like every other route."""

    isLeaf = True

    def render(self, request: IRequest) -> bytes:
        path = request.path.decode("latin-1", "replace")
        return OPENAI.respond(request, NotFound(f"Unknown request URL: {path}."))
