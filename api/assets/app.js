// Versus fight page: two names in, the answer streamed token by token over EventSource
// (GET /v1/fights/stream), and the picture requested alongside (GET /v1/images/stream).
//
// At most two streams are open at a time, one for the text and one for the picture, so
// that several tabs still work over HTTP/1.1. A dropped connection is resumed by
// EventSource itself: it reconnects with Last-Event-ID and the API sends only the rest.
'use strict';

(() => {
  // The API's first rules for a name (shared::key::Name::parse), in the same order and with
  // the same messages. What the API refuses beyond them (invisible characters, mixed scripts,
  // stacked marks) comes back as a 400 whose message is shown next to the field the same way.
  const MAX_NAME_CHARS = 100;
  const CONTROL = /\p{Cc}/u;
  // Length is counted in what a reader sees as characters (grapheme clusters), as the API does.
  const graphemes = typeof Intl.Segmenter === 'function' ? new Intl.Segmenter() : null;
  const length = (name) => (graphemes ? [...graphemes.segment(name)].length : [...name].length);

  // Connection failures in a row, with no event in between, before the page gives up on a
  // stream and offers to retry instead of letting EventSource try forever.
  const MAX_RECONNECTS = 5;

  const $ = (id) => document.getElementById(id);
  const form = $('fight-form');
  const inputs = { a: $('a'), b: $('b') };
  const formError = $('form-error');
  const result = $('result');
  const title = $('title');
  const cachedBadge = $('cached');
  const answer = $('answer');
  const status = $('status');
  const errorBox = $('error');
  const errorMessage = $('error-message');
  const retryButton = $('retry');
  const picture = $('picture');
  const pictureFrame = picture.querySelector('.picture-frame');
  const pictureNote = $('picture-note');
  const pictureRetry = $('picture-retry');

  // One text node that chunks are appended to, so that streaming never re-renders the answer.
  const answerText = document.createTextNode('');
  answer.append(answerText);

  /** The current matchup and its open streams. */
  let current = null;

  function nameError(field, raw) {
    const name = raw.trim();
    if (name === '') return `opponent \`${field}\` is empty`;
    if (CONTROL.test(name)) return `opponent \`${field}\` contains control characters`;
    if (length(name) > MAX_NAME_CHARS) {
      return `opponent \`${field}\` is longer than ${MAX_NAME_CHARS} characters`;
    }
    return null;
  }

  /** Sets `element`'s text, showing `backticked` parts of API messages as code. */
  function setMessage(element, message) {
    element.replaceChildren(
      ...message.split('`').map((part, i) => {
        if (i % 2 === 0) return document.createTextNode(part);
        const code = document.createElement('code');
        code.textContent = part;
        return code;
      }),
    );
  }

  function showFormError(field, message) {
    for (const [name, input] of Object.entries(inputs)) {
      input.setAttribute('aria-invalid', String(name === field));
    }
    setMessage(formError, message);
    formError.hidden = false;
    if (field && inputs[field]) inputs[field].focus();
  }

  function clearFormError() {
    for (const input of Object.values(inputs)) input.removeAttribute('aria-invalid');
    formError.hidden = true;
    formError.replaceChildren();
  }

  function streamUrl(path, a, b) {
    return `${path}?${new URLSearchParams({ a, b })}`;
  }

  function pageUrl(a, b) {
    return `/?${new URLSearchParams({ a, b })}`;
  }

  /** Validates the form and starts the fight; `history` is 'push', 'replace' or 'none'. */
  function submit(history) {
    const a = inputs.a.value;
    const b = inputs.b.value;
    for (const [field, value] of [['a', a], ['b', b]]) {
      const message = nameError(field, value);
      if (message) {
        stop();
        result.hidden = true;
        showFormError(field, message);
        return;
      }
    }
    clearFormError();
    const url = pageUrl(a.trim(), b.trim());
    if (history === 'push' && url !== location.pathname + location.search) {
      window.history.pushState(null, '', url);
    } else if (history !== 'none') {
      window.history.replaceState(null, '', url);
    }
    start(a.trim(), b.trim());
  }

  /** Closes every open stream of the current fight. */
  function stop() {
    if (!current) return;
    current.text?.close();
    current.picture?.close();
    current = null;
  }

  function start(a, b) {
    stop();
    current = { a, b, text: null, picture: null, cachedKnown: false };
    document.title = `${a} vs ${b} · Versus`;
    title.textContent = `${a} vs ${b}`;
    result.hidden = false;
    openText(current);
    openPicture(current);
  }

  // --- the answer ------------------------------------------------------------------------

  function setState(state) {
    result.dataset.state = state;
    answer.setAttribute('aria-busy', String(state === 'streaming'));
  }

  /** " Try again in 3 min." for an error that says when asking again may succeed. */
  function waitNote(seconds) {
    if (!(seconds > 0)) return '';
    const minutes = Math.ceil(seconds / 60);
    const wait = seconds < 60 ? `${seconds} s`
      : minutes < 60 ? `${minutes} min`
      : `${Math.floor(minutes / 60)} h ${minutes % 60} min`;
    return ` Try again in ${wait}.`;
  }

  function showError(message, retryable) {
    setMessage(errorMessage, message);
    retryButton.hidden = !retryable;
    errorBox.hidden = false;
    status.textContent = '';
    setState('error');
  }

  function openText(fight) {
    fight.text?.close();
    answerText.data = '';
    cachedBadge.hidden = true;
    errorBox.hidden = true;
    status.textContent = 'Asking the judges…';
    setState('streaming');

    const url = streamUrl('/v1/fights/stream', fight.a, fight.b);
    const source = new EventSource(url);
    fight.text = source;
    let sawMeta = false;
    let failures = 0;

    source.addEventListener('meta', (event) => {
      failures = 0;
      const meta = JSON.parse(event.data);
      // A reconnect sends meta again; only the first one says whether this was a hit.
      if (!sawMeta) {
        sawMeta = true;
        title.textContent = `${meta.a} vs ${meta.b}`;
        cachedBadge.hidden = !meta.cached;
      }
      status.textContent = meta.cached ? '' : 'Writing…';
    });
    source.addEventListener('chunk', (event) => {
      failures = 0;
      answerText.appendData(JSON.parse(event.data).delta);
    });
    source.addEventListener('reset', () => {
      failures = 0;
      answerText.data = '';
      status.textContent = 'The answer is being written again…';
    });
    source.addEventListener('done', (event) => {
      // Close before the server ends the stream, or EventSource would reconnect.
      source.close();
      const done = JSON.parse(event.data);
      status.textContent = done.model ? `Written by ${done.model}.` : '';
      setState('done');
    });
    // Both the API's `error` events and connection failures arrive as `error`: only the
    // former carry data.
    source.addEventListener('error', (event) => {
      if (event instanceof MessageEvent) {
        source.close();
        const error = JSON.parse(event.data);
        // A refused answer is withdrawn: what streamed before the refusal goes too.
        if (error.code === 'refused') answerText.data = '';
        const message = error.message || 'Something went wrong.';
        showError(message + waitNote(error.retry_after), Boolean(error.retryable));
        return;
      }
      if (source.readyState === EventSource.CLOSED) {
        // The API answered with something other than a stream: ask it why.
        if (sawMeta) showError('The connection to Versus was lost.', true);
        else explainRefusal(fight, url);
        return;
      }
      failures += 1;
      if (failures >= MAX_RECONNECTS) {
        source.close();
        showError('Versus cannot be reached right now.', true);
      } else {
        status.textContent = 'Connection lost, reconnecting…';
      }
    });
  }

  /** EventSource cannot read a refusal's body: fetch the same URL to show the API's words. */
  async function explainRefusal(fight, url) {
    const abort = new AbortController();
    let body = null;
    let status = 0;
    try {
      const response = await fetch(url, { headers: { Accept: 'application/json' }, signal: abort.signal });
      status = response.status;
      if (response.ok) abort.abort();
      else body = await response.json();
    } catch {
      // Unreachable, or not JSON: the generic message below will do.
    }
    if (current !== fight) return;
    const error = body?.error;
    if (status === 400 && error?.message) {
      // Bad input: the API's message belongs next to the inputs.
      result.hidden = true;
      stop();
      const field = /`(a|b)`/.exec(error.message)?.[1];
      showFormError(field, error.message);
      return;
    }
    // A limit says when to try again (its message has the wait); other refusals are final.
    const retryable = status === 429 || status < 400 || status >= 500;
    showError(error?.message || 'Versus cannot answer right now.', retryable);
  }

  retryButton.addEventListener('click', () => {
    if (!current) return;
    openText(current);
    if (picture.dataset.state === 'unavailable') openPicture(current);
  });

  // --- the picture -----------------------------------------------------------------------

  function setPicture(state, note) {
    picture.dataset.state = state;
    pictureNote.textContent = note || '';
    pictureNote.hidden = !note;
    if (state !== 'ready') pictureFrame.querySelector('img')?.remove();
    picture.setAttribute('aria-busy', String(state === 'drawing'));
  }

  function pictureUnavailable(fight, message, retryable) {
    if (current !== fight) return;
    fight.picture?.close();
    setPicture('unavailable', message || 'Picture unavailable.');
    pictureRetry.hidden = !retryable;
  }

  function openPicture(fight) {
    fight.picture?.close();
    pictureRetry.hidden = true;
    setPicture('drawing', 'Drawing the fight…');
    const source = new EventSource(streamUrl('/v1/images/stream', fight.a, fight.b));
    fight.picture = source;
    let failures = 0;

    source.addEventListener('meta', () => {
      failures = 0;
    });
    source.addEventListener('done', (event) => {
      source.close();
      const done = JSON.parse(event.data);
      const img = new Image();
      img.alt = `An AI-drawn picture of ${fight.a} fighting ${fight.b}`;
      img.decoding = 'async';
      img.addEventListener('load', () => {
        if (current !== fight) return;
        setPicture('ready');
        pictureFrame.append(img);
      });
      img.addEventListener('error', () => pictureUnavailable(fight, 'Picture unavailable.', true));
      img.src = done.url;
    });
    source.addEventListener('error', (event) => {
      if (event instanceof MessageEvent) {
        const error = JSON.parse(event.data);
        pictureUnavailable(fight, 'Picture unavailable.', Boolean(error.retryable));
      } else if (source.readyState === EventSource.CLOSED) {
        pictureUnavailable(fight, 'Picture unavailable.', false);
      } else if (++failures >= MAX_RECONNECTS) {
        pictureUnavailable(fight, 'Picture unavailable.', true);
      }
    });
  }

  pictureRetry.addEventListener('click', () => {
    if (current) openPicture(current);
  });

  // --- the address bar -------------------------------------------------------------------

  /** Shows the fight the address names, if any (on load, and on back and forward). */
  function loadFromAddress() {
    const params = new URLSearchParams(location.search);
    if (!params.has('a') && !params.has('b')) {
      stop();
      result.hidden = true;
      clearFormError();
      document.title = 'Versus: who would win?';
      return;
    }
    inputs.a.value = params.get('a') ?? '';
    inputs.b.value = params.get('b') ?? '';
    submit('none');
  }

  form.addEventListener('submit', (event) => {
    event.preventDefault();
    submit('push');
  });
  window.addEventListener('popstate', loadFromAddress);
  window.addEventListener('pagehide', stop);
  // A page restored from the back-forward cache had its streams closed on the way out.
  window.addEventListener('pageshow', (event) => {
    if (event.persisted) loadFromAddress();
  });
  loadFromAddress();
})();
