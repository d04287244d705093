/* What the server offers (GET /api/models): one copy for the whole page, which the sidebar's
 * picker, the compare columns and the evaluation's model list all read. A new answer is
 * announced with the "mt:catalog" event.
 */
import { ApiError, apiFetch, describeFailure } from "./api.js";

let catalog = { models: [], adapters: [] };
let loaded = false;

export const getCatalog = () => catalog;
export const catalogLoaded = () => loaded;

/** Fetches the list again; rejects with the reason when the server cannot give it. */
export async function fetchCatalog() {
  const response = await apiFetch("/api/models", { cache: "no-store" });
  if (!response.ok) throw new ApiError(await describeFailure(response));
  const body = await response.json();
  catalog = {
    models: Array.isArray(body.models) ? body.models : [],
    adapters: Array.isArray(body.adapters) ? body.adapters : [],
  };
  loaded = true;
  document.dispatchEvent(new CustomEvent("mt:catalog", { detail: catalog }));
  return catalog;
}
