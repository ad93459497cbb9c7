// Starts Swagger UI on this server's OpenAPI document. A file, not an inline
// script, so that the page's Content-Security-Policy can refuse inline code.
"use strict";

window.ui = SwaggerUIBundle({
  url: new URL("openapi.json", document.baseURI).href,
  dom_id: "#swagger-ui",
  layout: "BaseLayout",
  presets: [SwaggerUIBundle.presets.apis],
  deepLinking: true,
  // The default would send the document's URL to validator.swagger.io for a badge.
  validatorUrl: null,
  // A token typed into "Authorize" lives as long as the tab, never in localStorage.
  persistAuthorization: false,
});
