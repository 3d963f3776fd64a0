// Versus fight page: two names in, the answer streamed token by token over EventSource
// (GET /v1/fights/stream), and the picture drawn alongside (GET /v1/images/stream).
//
// Nothing that costs money starts without the visitor's say. The API tells the page, in
// <meta name="versus:…"> tags (api/src/preview.rs), whether the text may start as the page
// loads and what is stored already:
// - the Fight button (a click or the keyboard) starts the text and the picture;
// - an address the visitor typed, or this site's own navigation, starts the text at once;
// - a link, a pop-up or a redirect from another site shows what is stored (the answer, the
//   picture) at once and waits for Fight before asking for anything new;
// - a picture that is not stored is drawn only when the visitor asks: Fight, or the
//   picture's own button. Loading an address never draws one.
//
// A finished answer says which model wrote it, in the quiet status line under it; one that a
// fallback model made while the usual one could not (`degraded`) says "Answered by MODEL", and
// such a picture "Drawn by MODEL" under it.
//
// While a picture is drawn, the stream sends its partial images (`partial` {index, url}): each
// is shown in the picture's frame as it arrives, blurred less with each one, until the final
// picture takes its place. A partial is never the picture: it is not kept, reported or shared.
//
// A finished answer and a drawn picture each have a Report control (POST
// /v1/fights/{key}/report, /v1/images/{key}/report): it never calls the AI, and what the
// visitor reported stays on their screen (the API hides an answer once enough people report
// it unsafe).
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

  // How long after the page is shown a press on Fight or Draw is not taken, on a page that
  // another site opened: a click or a key meant for that site (a double click, a pop-up that
  // opens under the pointer) must not land on Fight.
  const SETTLE_MS = 500;

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
  const pictureBy = $('picture-by');
  const drawButton = $('draw');

  // One text node that chunks are appended to, so that streaming never re-renders the answer.
  const answerText = document.createTextNode('');
  answer.append(answerText);

  /** The current matchup and its open streams. */
  let current = null;

  /** What the API said about the address this page was loaded from (api/src/preview.rs). */
  const meta = (name) => document.querySelector(`meta[name="versus:${name}"]`)?.content || null;
  const landing = {
    /** The fight the address names (as pageUrl writes it), or null. */
    url: fightUrl(new URLSearchParams(location.search)),
    /** The text of a new answer may start at once: typed, or this site's own navigation. */
    start: meta('start') === 'text',
    /** The stored answer's key; the refusal's message, if moderation refused the matchup. */
    answer: meta('answer'),
    refused: meta('refused'),
  };
  /** The fights the visitor asked for in this page: going back to one starts it again. */
  const asked = new Set();
  /** The stored pictures this page knows of, by fight: `{url, key, model, degraded}`. */
  const pictures = new Map();
  if (landing.url && meta('picture')) {
    const fallback = meta('picture-fallback');
    pictures.set(landing.url, {
      url: meta('picture'),
      key: meta('picture-key'),
      model: fallback,
      degraded: fallback !== null,
    });
  }
  /** When the page was last shown (see SETTLE_MS). */
  let shownAt = performance.now();

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

  /** The fight an address's query names, as pageUrl writes it, or null. */
  function fightUrl(params) {
    if (!params.has('a') && !params.has('b')) return null;
    return pageUrl((params.get('a') ?? '').trim(), (params.get('b') ?? '').trim());
  }

  /** Whether the text of `url`'s fight may start without a press on Fight. */
  function mayStart(url) {
    return asked.has(url) || (url === landing.url && landing.start);
  }

  /** Whether a press is the visitor's own: see SETTLE_MS. */
  function settled() {
    return landing.start || performance.now() - shownAt >= SETTLE_MS;
  }

  /** The two names, trimmed, if both are valid; else says why next to the field. */
  function validNames() {
    const a = inputs.a.value;
    const b = inputs.b.value;
    for (const [field, value] of [['a', a], ['b', b]]) {
      const message = nameError(field, value);
      if (message) {
        stop();
        result.hidden = true;
        showFormError(field, message);
        return null;
      }
    }
    clearFormError();
    return { a: a.trim(), b: b.trim() };
  }

  /** The visitor pressed Fight (a click or the keyboard): the text and the picture start. */
  function fight() {
    const names = validNames();
    if (!names) return;
    const url = pageUrl(names.a, names.b);
    if (url !== location.pathname + location.search) {
      window.history.pushState(null, '', url);
    } else {
      window.history.replaceState(null, '', url);
    }
    asked.add(url);
    start(names.a, names.b, { text: 'stream', picture: 'draw' });
  }

  /** Closes every open stream of the current fight. */
  function stop() {
    if (!current) return;
    current.text?.close();
    current.picture?.close();
    current = null;
  }

  /**
   * Shows the fight of `a` and `b`. `how.text`: 'stream' (ask for it: a hit costs nothing, a
   * miss starts it), 'stored' (fetch the stored answer, never a generation), 'refused', or
   * 'wait' (for Fight). `how.picture`: 'draw' (ask for it), 'show' (the stored one), or
   * 'offer' (the picture's own button).
   */
  function start(a, b, how) {
    stop();
    const fight = { a, b, url: pageUrl(a, b), text: null, picture: null };
    current = fight;
    document.title = `${a} vs ${b} · Versus`;
    title.textContent = `${a} vs ${b}`;
    result.hidden = false;
    if (how.text === 'stream') openText(fight);
    else if (how.text === 'stored') showStored(fight, landing.answer);
    else if (how.text === 'refused') showRefused(landing.refused);
    else waitForFight();
    if (how.picture === 'draw') openPicture(fight);
    else if (how.picture === 'show') showPicture(fight, pictures.get(fight.url));
    else offerPicture();
  }

  // --- the answer ------------------------------------------------------------------------

  /** The status line of a finished answer `{model, degraded}`: which model wrote it. */
  function writtenBy(done) {
    if (!done.model) return '';
    if (done.degraded) return `Answered by ${done.model}, a fallback model.`;
    return `Written by ${done.model}.`;
  }

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

  /** Clears the answer area for what comes next. */
  function clearAnswer() {
    answerText.data = '';
    cachedBadge.hidden = true;
    errorBox.hidden = true;
    reportAnswer(null);
  }

  /** A fight that needs a new answer, on a page another site opened: nothing is asked yet. */
  function waitForFight() {
    clearAnswer();
    status.textContent = 'Press Fight! to ask who would win.';
    setState('waiting');
  }

  function showRefused(message) {
    clearAnswer();
    showError(message, false);
  }

  /** The stored answer by its key: `GET /v1/fights/{key}` never starts a generation. */
  async function showStored(fight, key) {
    clearAnswer();
    status.textContent = 'Fetching the answer…';
    setState('loading');
    let body = null;
    try {
      const response = await fetch(`/v1/fights/${encodeURIComponent(key)}`, {
        headers: { Accept: 'application/json' },
      });
      if (response.ok) body = await response.json();
    } catch {
      // Unreachable: the visitor may still press Fight.
    }
    if (current !== fight) return;
    // Gone meanwhile (purged, withdrawn): a new answer waits for Fight like any other.
    if (typeof body?.text !== 'string') {
      waitForFight();
      return;
    }
    title.textContent = `${body.a} vs ${body.b}`;
    answerText.data = body.text;
    cachedBadge.hidden = false;
    status.textContent = writtenBy(body);
    setState('done');
    reportAnswer(body.key || key);
  }

  function openText(fight) {
    fight.text?.close();
    clearAnswer();
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
      status.textContent = writtenBy(done);
      setState('done');
      reportAnswer(done.key);
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
    if (!current || !settled()) return;
    asked.add(current.url);
    openText(current);
    if (picture.dataset.state === 'unavailable') openPicture(current);
  });

  // --- the picture -----------------------------------------------------------------------

  /** The fight whose partial image the frame shows (while its picture is drawn), if any. */
  let partialOf = null;

  /**
   * Puts the picture in `state`, with `note` in its frame. Anything but 'ready' takes the
   * picture out of the frame, and the partial image too unless `keepPartial` (the final
   * picture then takes its place once loaded).
   */
  function setPicture(state, note, keepPartial = false) {
    picture.dataset.state = state;
    pictureNote.textContent = note || '';
    pictureNote.hidden = !note;
    if (state !== 'ready') {
      for (const img of pictureFrame.querySelectorAll('img')) {
        if (!(keepPartial && img.classList.contains('partial'))) img.remove();
      }
      if (!keepPartial) clearPartial();
      pictureBy.hidden = true;
      reportPicture(null);
    }
    picture.setAttribute('aria-busy', String(state === 'drawing' || state === 'loading'));
  }

  /** Takes the partial image out of the frame. */
  function clearPartial() {
    pictureFrame.querySelector('img.partial')?.remove();
    delete picture.dataset.partial;
    partialOf = null;
  }

  /**
   * Shows partial image `index` of the picture of `fight` being drawn, already loaded from
   * `url`, in the frame, in place of the one before: the same box as the picture, so nothing
   * moves. It is blurred less with each partial (app.css); the live region says nothing.
   */
  function showPartial(fight, url, index) {
    let img = pictureFrame.querySelector('img.partial');
    if (!img || partialOf !== fight) {
      img?.remove();
      img = document.createElement('img');
      img.className = 'partial';
      img.alt = `The picture of ${fight.a} fighting ${fight.b}, being drawn`;
      pictureFrame.prepend(img);
    }
    partialOf = fight;
    img.dataset.step = String(Math.min(index, 3));
    img.src = url;
    picture.dataset.partial = 'shown';
  }

  function pictureUnavailable(fight, message, retryable) {
    if (current !== fight) return;
    fight.picture?.close();
    setPicture('unavailable', message || 'Picture unavailable.');
    drawButton.textContent = 'Draw it again';
    drawButton.hidden = !retryable;
  }

  /** No picture is stored, or none this page knows of: the visitor may ask for one. */
  function offerPicture() {
    setPicture('offered', 'No picture of this fight yet.');
    drawButton.textContent = 'Draw the picture';
    drawButton.hidden = false;
  }

  /**
   * Shows the stored picture `{url, key, model, degraded}`: the partial image of its drawing, if
   * shown, stays until the picture has loaded and takes its place.
   */
  function showPicture(fight, { url, key, model, degraded }) {
    drawButton.hidden = true;
    setPicture('loading', 'Loading the picture…', partialOf === fight);
    const img = new Image();
    img.alt = `An AI-drawn picture of ${fight.a} fighting ${fight.b}`;
    img.decoding = 'async';
    img.addEventListener('load', () => {
      if (current !== fight) return;
      clearPartial();
      setPicture('ready');
      pictureFrame.append(img);
      // Shown with the picture and its Report control, below the frame: nothing above moves.
      pictureBy.textContent = degraded && model ? `Drawn by ${model}, a fallback model.` : '';
      pictureBy.hidden = !pictureBy.textContent;
      reportPicture(key);
    });
    img.addEventListener('error', () => pictureUnavailable(fight, 'Picture unavailable.', true));
    img.src = url;
  }

  function openPicture(fight) {
    fight.picture?.close();
    drawButton.hidden = true;
    setPicture('drawing', 'Drawing the fight…');
    const source = new EventSource(streamUrl('/v1/images/stream', fight.a, fight.b));
    fight.picture = source;
    let failures = 0;
    // The newest partial image shown: each is loaded before it is shown, and one that loads
    // after a newer one is not.
    let shown = -1;
    // Bumped by `reset`: a partial of the attempt before that loads late is not shown.
    let drawing = 0;

    source.addEventListener('meta', () => {
      failures = 0;
    });
    source.addEventListener('partial', (event) => {
      failures = 0;
      const { index, url } = JSON.parse(event.data);
      if (typeof url !== 'string' || !Number.isInteger(index)) return;
      const of = drawing;
      const next = new Image();
      next.src = url;
      // Loaded and decoded before it is shown, so the one before stays until it can be
      // replaced; a partial that cannot be loaded (removed already) is skipped.
      next.decode().then(
        () => {
          if (current !== fight || fight.picture !== source || of !== drawing) return;
          if (index <= shown || picture.dataset.state !== 'drawing') return;
          shown = index;
          showPartial(fight, url, index);
        },
        () => {},
      );
    });
    // The picture is being drawn again: its partials start afresh.
    source.addEventListener('reset', () => {
      shown = -1;
      drawing += 1;
      if (current === fight && partialOf === fight) {
        clearPartial();
        setPicture('drawing', 'Drawing the fight…');
      }
    });
    source.addEventListener('done', (event) => {
      source.close();
      const done = JSON.parse(event.data);
      const stored = {
        url: done.url,
        key: done.key,
        model: done.model,
        degraded: Boolean(done.degraded),
      };
      pictures.set(fight.url, stored);
      if (current === fight) showPicture(fight, stored);
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

  // The picture's own button: the visitor asks for it (a click or the keyboard).
  drawButton.addEventListener('click', () => {
    if (current && settled()) openPicture(current);
  });

  // --- reports ---------------------------------------------------------------------------

  /** What this page reported, as `route/key`: the control then says so instead of asking. */
  const reported = new Set();

  /**
   * Wires the Report control `#report-<side>` (the answer's or the picture's), which reports to
   * `/v1/<route>/{key}/report`, and returns the function that shows it for a key, or hides it
   * (null): it is shown only for a finished answer, or a picture on screen.
   *
   * The control opens a small form below it (nothing above it moves): the focus goes to the
   * first reason, the reasons are one radio group (arrow keys), Send or Enter sends, and Cancel
   * or Escape closes it with the focus back on the control. What the API answered is said in
   * the control's polite live region.
   */
  function reporter(side, route) {
    const box = $(`report-${side}`);
    const toggle = $(`report-${side}-open`);
    const reportForm = $(`report-${side}-form`);
    const send = $(`report-${side}-send`);
    const note = $(`report-${side}-note`);
    const reasons = [...reportForm.querySelectorAll('input[type="radio"]')];
    const label = toggle.textContent;
    let key = null;
    let sending = false;

    function close(focus) {
      reportForm.hidden = true;
      toggle.setAttribute('aria-expanded', 'false');
      if (focus) toggle.focus();
    }

    /** The control of an answer this page reported says so, and opens nothing. */
    function markReported() {
      const done = key !== null && reported.has(`${route}/${key}`);
      toggle.textContent = done ? 'Reported' : label;
      if (done) toggle.setAttribute('aria-disabled', 'true');
      else toggle.removeAttribute('aria-disabled');
    }

    toggle.addEventListener('click', () => {
      if (key === null || toggle.getAttribute('aria-disabled') === 'true') return;
      if (!reportForm.hidden) {
        close(true);
        return;
      }
      for (const reason of reasons) reason.checked = false;
      note.textContent = '';
      reportForm.hidden = false;
      toggle.setAttribute('aria-expanded', 'true');
      reasons[0].focus();
    });
    $(`report-${side}-cancel`).addEventListener('click', () => close(true));
    reportForm.addEventListener('keydown', (event) => {
      if (event.key !== 'Escape') return;
      event.preventDefault();
      close(true);
    });
    reportForm.addEventListener('submit', async (event) => {
      event.preventDefault();
      if (sending || key === null) return;
      const reason = reasons.find((r) => r.checked)?.value;
      if (!reason) {
        note.textContent = 'Choose a reason first.';
        reasons[0].focus();
        return;
      }
      const target = key;
      sending = true;
      send.setAttribute('aria-disabled', 'true');
      let counted = null;
      let message = 'Versus cannot take the report right now.';
      try {
        const response = await fetch(`/v1/${route}/${encodeURIComponent(target)}/report`, {
          method: 'POST',
          headers: { Accept: 'application/json', 'Content-Type': 'application/json' },
          body: JSON.stringify({ reason }),
        });
        const body = await response.json().catch(() => null);
        if (response.ok) counted = body?.counted !== false;
        // A limit's message says when to try again.
        else if (body?.error?.message) message = body.error.message;
      } catch {
        message = 'Versus cannot be reached right now.';
      }
      sending = false;
      send.removeAttribute('aria-disabled');
      if (counted !== null) reported.add(`${route}/${target}`);
      // Another answer is on screen now: this one's outcome is not news about it.
      if (key !== target) return;
      if (counted !== null) {
        close(true);
        markReported();
        message = counted ? 'Thanks — reported.' : 'Thanks — you had reported it already.';
      }
      note.textContent = message;
    });

    return (next) => {
      if (next === key && !box.hidden) return;
      key = next ?? null;
      close(false);
      note.textContent = '';
      markReported();
      box.hidden = key === null;
    };
  }

  const reportAnswer = reporter('answer', 'fights');
  const reportPicture = reporter('picture', 'images');

  // --- the address bar -------------------------------------------------------------------

  /**
   * Shows the fight the address names, if any (on load, and on back and forward): its text
   * starts only if the visitor asked for it in this page or `trusted` and the page's own
   * address may start it (see mayStart); otherwise what is stored is shown and the rest
   * waits for Fight. A picture is never drawn from here.
   */
  function loadFromAddress(trusted) {
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
    const names = validNames();
    if (!names) return;
    const url = pageUrl(names.a, names.b);
    // Someone else's fragment navigation to the fight on show changes nothing.
    if (!trusted && current?.url === url) return;
    const landed = url === landing.url;
    let text = 'wait';
    if (trusted && mayStart(url)) text = 'stream';
    else if (landed && landing.answer) text = 'stored';
    else if (landed && landing.refused) text = 'refused';
    start(names.a, names.b, { text, picture: pictures.has(url) ? 'show' : 'offer' });
  }

  // Suggestions as you type (GET /v1/names/suggest): names of answers already stored, so that
  // visitors converge on spellings that are hits. Each input is a WAI-ARIA combobox with a
  // listbox: ArrowDown and ArrowUp move through the names, Enter or a click picks one (Enter
  // then does not send the form), Escape closes the list. A request goes out once typing
  // pauses, and a newer one aborts it.
  const SUGGEST_AFTER_MS = 150;

  function suggester(input) {
    const list = $(`${input.id}-suggestions`);
    let timer = 0;
    let request = null;
    let options = [];
    let active = -1;

    function close() {
      clearTimeout(timer);
      request?.abort();
      request = null;
      list.hidden = true;
      list.replaceChildren();
      options = [];
      active = -1;
      input.setAttribute('aria-expanded', 'false');
      input.removeAttribute('aria-activedescendant');
    }

    function highlight(index) {
      active = index;
      options.forEach((option, i) => option.setAttribute('aria-selected', String(i === index)));
      if (index < 0) {
        input.removeAttribute('aria-activedescendant');
        return;
      }
      input.setAttribute('aria-activedescendant', options[index].id);
      options[index].scrollIntoView({ block: 'nearest' });
    }

    function pick(index) {
      input.value = options[index].textContent;
      close();
    }

    function show(names) {
      if (names.length === 0 || document.activeElement !== input) {
        close();
        return;
      }
      options = names.map((name, i) => {
        const option = document.createElement('li');
        option.id = `${input.id}-suggestion-${i}`;
        option.setAttribute('role', 'option');
        option.setAttribute('aria-selected', 'false');
        option.textContent = name;
        return option;
      });
      active = -1;
      list.replaceChildren(...options);
      list.hidden = false;
      input.setAttribute('aria-expanded', 'true');
      input.removeAttribute('aria-activedescendant');
    }

    async function suggest(q) {
      request?.abort();
      const mine = new AbortController();
      request = mine;
      try {
        const response = await fetch(`/v1/names/suggest?q=${encodeURIComponent(q)}`, {
          signal: mine.signal,
        });
        const body = response.ok ? await response.json() : { names: [] };
        if (request === mine) show(Array.isArray(body.names) ? body.names : []);
      } catch {
        // Aborted by a newer request, or the API is unreachable: no suggestions.
      }
    }

    input.addEventListener('input', () => {
      clearTimeout(timer);
      const q = input.value.trim();
      if (nameError(input.id, q) !== null) {
        close();
        return;
      }
      timer = setTimeout(() => suggest(q), SUGGEST_AFTER_MS);
    });
    input.addEventListener('keydown', (event) => {
      if (event.isComposing || list.hidden) return;
      switch (event.key) {
        case 'ArrowDown':
          event.preventDefault();
          highlight((active + 1) % options.length);
          break;
        case 'ArrowUp':
          event.preventDefault();
          highlight(active <= 0 ? options.length - 1 : active - 1);
          break;
        case 'Enter':
          if (active >= 0) {
            event.preventDefault();
            pick(active);
          } else {
            close();
          }
          break;
        case 'Escape':
          event.preventDefault();
          close();
          break;
        default:
      }
    });
    // A press on the list keeps the focus in the input, so that the click lands as a pick.
    list.addEventListener('mousedown', (event) => event.preventDefault());
    list.addEventListener('click', (event) => {
      const option = event.target.closest('[role="option"]');
      if (option) pick(options.indexOf(option));
    });
    input.addEventListener('blur', close);
    return close;
  }
  const closeSuggestions = Object.values(inputs).map(suggester);

  form.addEventListener('submit', (event) => {
    event.preventDefault();
    for (const close of closeSuggestions) close();
    if (settled()) fight();
  });
  // Back and forward. This page makes no entry with a fragment: one is a navigation by someone
  // else (another site can navigate a window it opened to this address plus `#…` without
  // loading it again), which must not start what its first load did not.
  window.addEventListener('popstate', () => loadFromAddress(location.hash === ''));
  window.addEventListener('pagehide', stop);
  // A page restored from the back-forward cache had its streams closed on the way out.
  window.addEventListener('pageshow', (event) => {
    shownAt = performance.now();
    if (event.persisted) loadFromAddress(true);
  });
  document.addEventListener('visibilitychange', () => {
    if (document.visibilityState === 'visible') shownAt = performance.now();
  });
  // A prerendered page starts nothing until the visitor actually opens it.
  if (document.prerendering) {
    document.addEventListener(
      'prerenderingchange',
      () => {
        shownAt = performance.now();
        loadFromAddress(true);
      },
      { once: true },
    );
  } else {
    loadFromAddress(true);
  }
})();
