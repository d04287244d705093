/* The compare slots the server has loaded, in column order: the compare view loads them and
 * draws its columns from them; the evaluate view can take them over as its models.
 */

let slots = [];

/** The loaded slots, as GET /api/compare/slots describes them (copies: the list is changed only here). */
export const loadedSlots = () => slots.map((slot) => ({ ...slot }));

export function setLoadedSlots(list) {
  slots = Array.isArray(list) ? list.map((slot) => ({ ...slot })) : [];
}
