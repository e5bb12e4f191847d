// A reader of server-sent events (text/event-stream) over a fetch body, for browsers
// and Node alike: it uses the stream's reader rather than async iteration, which not
// every browser offers on a ReadableStream.

/**
 * Yields `{event, data, id}` for each event of `body` (a ReadableStream of bytes).
 * Comments (keep-alives) and events without data are skipped.
 */
export async function* readEvents(body) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = '';
  let event = '';
  let data = [];
  let id = null;
  try {
    for (;;) {
      const { done, value } = await reader.read();
      buffer += done ? decoder.decode() : decoder.decode(value, { stream: true });
      let nl;
      while ((nl = buffer.search(/\r\n|\r|\n/)) >= 0) {
        // A CR at the end of what has arrived may be the first half of a CRLF.
        if (!done && nl === buffer.length - 1 && buffer[nl] === '\r') break;
        const line = buffer.slice(0, nl);
        buffer = buffer.slice(nl + (buffer.startsWith('\r\n', nl) ? 2 : 1));
        if (line === '') {
          if (data.length > 0) yield { event: event || 'message', data: data.join('\n'), id };
          event = '';
          data = [];
          continue;
        }
        if (line.startsWith(':')) continue;
        const colon = line.indexOf(':');
        const field = colon < 0 ? line : line.slice(0, colon);
        let value = colon < 0 ? '' : line.slice(colon + 1);
        if (value.startsWith(' ')) value = value.slice(1);
        if (field === 'event') event = value;
        else if (field === 'data') data.push(value);
        else if (field === 'id') id = value;
      }
      if (done) {
        if (data.length > 0) yield { event: event || 'message', data: data.join('\n'), id };
        return;
      }
    }
  } finally {
    // The consumer stopped early (break, return, throw): close the connection.
    await reader.cancel().catch(() => {});
  }
}
