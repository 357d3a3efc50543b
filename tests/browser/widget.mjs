// Drives the chat widget (static/chat.html) in Debian's headless Chromium for tests/e2e_widget.rs.
//
//   node tests/browser/widget.mjs <page-url>
//
// Speaks newline-delimited JSON: events on stdout (nothing else goes there), commands on stdin,
// diagnostics (browser console, page errors, websocket frames) on stderr. Any failure prints
// {"event":"error","message":...} and exits 1.
//
// Environment: CHROMIUM (browser binary, default /usr/bin/chromium), SB_SCREENSHOT (where to save
// a final screenshot), SB_TIMEOUT_MS (every page wait, default 20 s), SB_COMMAND_TIMEOUT_MS (how
// long to wait for the next command, default 90 s: the test produces to Kafka in between).

import { chromium } from 'playwright-core';
import { createInterface } from 'node:readline';

const TIMEOUT = Number(process.env.SB_TIMEOUT_MS) || 20_000;
const COMMAND_TIMEOUT = Number(process.env.SB_COMMAND_TIMEOUT_MS) || 90_000;
const FIRST = '光猫一直红灯，网络断了 since this morning';
const SECOND = 'second message while offline 第二条';
const THIRD = 'third: 信号很差 📶';

const emit = (obj) => process.stdout.write(JSON.stringify(obj) + '\n');
const diag = (...parts) => process.stderr.write(`[${new Date().toISOString()}] ${parts.join(' ')}\n`);
const fail = (message) => { throw new Error(message); };

// ---- stdin commands ----
const commands = [];
const waiters = [];
let stdinClosed = false;
const rl = createInterface({ input: process.stdin });
rl.on('line', (line) => {
  if (!line.trim()) return;
  diag('command:', line);
  const w = waiters.shift();
  if (w) w.resolve(line); else commands.push(line);
});
rl.on('close', () => {
  stdinClosed = true;
  for (const w of waiters.splice(0)) w.reject(new Error('stdin closed while waiting for a command'));
});

async function command(want) {
  let line = commands.shift();
  if (line === undefined) {
    if (stdinClosed) fail(`stdin closed while waiting for command ${want}`);
    line = await new Promise((resolve, reject) => {
      const w = { resolve, reject };
      waiters.push(w);
      setTimeout(() => {
        const i = waiters.indexOf(w);
        if (i >= 0) { waiters.splice(i, 1); reject(new Error(`no command ${want} within ${COMMAND_TIMEOUT} ms`)); }
      }, COMMAND_TIMEOUT).unref();
    });
  }
  let cmd;
  try { cmd = JSON.parse(line); } catch { fail(`command is not JSON: ${line}`); }
  if (cmd.cmd !== want) fail(`expected command ${want}, got ${line}`);
  return cmd;
}

// ---- page helpers ----
let page;
const pageErrors = [];

/** Waits for `fn(arg)` to return a truthy value in the page; returns it. */
async function until(what, fn, arg) {
  try {
    const handle = await page.waitForFunction(fn, arg, { timeout: TIMEOUT, polling: 50 });
    return await handle.jsonValue();
  } catch (e) {
    fail(`timed out after ${TIMEOUT} ms waiting for ${what}: ${e.message.split('\n')[0]}`);
  }
}

const sessionId = () => page.evaluate(() => document.querySelector('#sb-chat')?.getAttribute('data-session-id') || null);
const replyCount = () => page.locator('.sb-reply').count();

/** The nth own message (0-based) once acknowledged: {client_msg_id, record_id, reference, text}. */
function acked(n, what) {
  return until(what, (n) => {
    const el = document.querySelectorAll('#sb-log .sb-own')[n];
    if (!el || !el.classList.contains('sb-acked')) return null;
    return {
      client_msg_id: el.getAttribute('data-client-msg-id'),
      record_id: el.getAttribute('data-record-id'),
      reference: el.getAttribute('data-reference'),
      text: el.innerText,
    };
  }, n);
}

async function waitReply(text) {
  try {
    await page.locator('.sb-reply', { hasText: text }).first().waitFor({ state: 'visible', timeout: TIMEOUT });
  } catch (e) {
    fail(`no visible reply containing ${JSON.stringify(text)} within ${TIMEOUT} ms`);
  }
}

async function waitState(state) {
  await until(`data-state=${state}`, (s) => document.querySelector('#sb-chat')?.getAttribute('data-state') === s, state);
}

// ---- the scenario ----
async function run(browser, url) {
  const context = await browser.newContext({ locale: 'zh-CN' });
  page = await context.newPage();
  page.setDefaultTimeout(TIMEOUT);
  page.on('console', (m) => diag(`console.${m.type()}:`, m.text()));
  page.on('pageerror', (e) => { pageErrors.push(e.message); diag('pageerror:', e.stack || e.message); });
  page.on('requestfailed', (r) => diag('request failed:', r.url(), r.failure()?.errorText || ''));
  page.on('websocket', (ws) => {
    diag('websocket open:', ws.url());
    ws.on('framesent', (f) => diag('ws >', String(f.payload).slice(0, 300)));
    ws.on('framereceived', (f) => diag('ws <', String(f.payload).slice(0, 300)));
    ws.on('socketerror', (e) => diag('ws error:', e));
    ws.on('close', () => diag('websocket closed:', ws.url()));
  });

  // a. ready
  const resp = await page.goto(url, { timeout: TIMEOUT });
  if (!resp || !resp.ok()) fail(`GET ${url} answered ${resp && resp.status()}`);
  const sid = await until('the welcome (data-state=open and data-session-id)', () => {
    const root = document.querySelector('#sb-chat');
    return root && root.getAttribute('data-state') === 'open' && root.getAttribute('data-session-id');
  });
  // A customer token handed over in the fragment must not stay in the address bar.
  if (page.url().includes('customer_token')) fail(`the customer token stayed in the URL: ${page.url()}`);
  emit({ event: 'ready', session_id: sid });

  // b. first complaint typed and sent with the button
  await page.locator('#sb-input').fill(FIRST);
  if (await page.locator('#sb-send').isDisabled()) fail('#sb-send is disabled with text in #sb-input');
  await page.locator('#sb-send').click();
  const first = await acked(0, 'the first message to be acknowledged');
  if (!first.record_id || !first.reference) fail(`acked message lacks data-record-id/data-reference: ${JSON.stringify(first)}`);
  if (!first.text.includes(first.reference)) fail(`the reference ${first.reference} is not shown in ${JSON.stringify(first.text)}`);
  if (!(await page.locator('.sb-own').first().getByText(first.reference, { exact: false }).isVisible())) {
    fail(`the reference ${first.reference} is not visible`);
  }
  if ((await page.locator('#sb-input').inputValue()) !== '') fail('#sb-input not cleared after sending');
  if (!(await page.locator('#sb-send').isDisabled())) fail('#sb-send enabled with an empty #sb-input');
  emit({ event: 'acked', n: 1, client_msg_id: first.client_msg_id, record_id: first.record_id, reference: first.reference });

  // c. a reply
  const c = await command('expect_reply');
  await waitReply(c.text);
  emit({ event: 'reply_seen', replies: await replyCount() });

  // d. offline: a message is queued
  await command('disconnect');
  await page.evaluate(() => window.SwitchboardChat.disconnect());
  await waitState('closed');
  await page.evaluate((t) => window.SwitchboardChat.send(t), SECOND);
  await until('the offline message to be shown', () => document.querySelectorAll('#sb-log .sb-own').length === 2);
  emit({ event: 'disconnected' });

  // e. resume: the queued message is sent, the missed reply arrives
  const e = await command('reconnect');
  await page.evaluate(() => window.SwitchboardChat.connect());
  await waitState('open');
  const second = await acked(1, 'the offline message to be acknowledged after reconnecting');
  await waitReply(e.text);
  const sid2 = await sessionId();
  if (sid2 !== sid) fail(`session changed on resume: ${sid} -> ${sid2}`);
  emit({ event: 'resumed', session_id: sid2, record_id: second.record_id, replies: await replyCount() });

  // f. the socket dies right after a send
  await command('drop_during_send');
  await page.evaluate((t) => {
    window.__sbDropped = window.SwitchboardChat.socket;
    window.SwitchboardChat.send(t);
    window.SwitchboardChat.dropSocket();
  }, THIRD);
  const third = await acked(2, 'the third message to be acknowledged after the drop');
  const reconnected = await page.evaluate(() => {
    const s = window.SwitchboardChat.socket;
    return !!s && s !== window.__sbDropped;
  });
  if (!reconnected) fail('the third message was acknowledged but the widget did not reconnect');
  emit({ event: 'acked', n: 3, record_id: third.record_id, session_id: await sessionId() });

  // g. final state of the page
  const final = await page.evaluate(() => {
    const own = [...document.querySelectorAll('#sb-log .sb-own')].map((el) => ({
      acked: el.classList.contains('sb-acked'),
      record_id: el.getAttribute('data-record-id'),
      client_msg_id: el.getAttribute('data-client-msg-id'),
    }));
    const seqs = [...document.querySelectorAll('#sb-log .sb-reply')].map((el) => el.getAttribute('data-seq'));
    return { own, seqs };
  });
  if (final.own.length !== 3) fail(`expected 3 own messages, found ${final.own.length}: ${JSON.stringify(final.own)}`);
  if (!final.own.every((o) => o.acked)) fail(`not every own message is acknowledged: ${JSON.stringify(final.own)}`);
  const recordIds = final.own.map((o) => o.record_id);
  if (new Set(recordIds).size !== 3) fail(`record ids are not distinct: ${JSON.stringify(recordIds)}`);
  if (new Set(final.own.map((o) => o.client_msg_id)).size !== 3) fail(`client_msg_ids are not distinct: ${JSON.stringify(final.own)}`);
  if (new Set(final.seqs).size !== final.seqs.length) fail(`a reply is shown twice (data-seq ${JSON.stringify(final.seqs)})`);
  if (pageErrors.length) fail(`page errors: ${pageErrors.join(' | ')}`);
  if (process.env.SB_SCREENSHOT) await page.screenshot({ path: process.env.SB_SCREENSHOT, fullPage: true });
  emit({ event: 'done', own: final.own.length, replies: final.seqs.length, record_ids: recordIds });
  await context.close();
}

const url = process.argv[2];
let browser;
let code = 0;
try {
  if (!url) fail('usage: node tests/browser/widget.mjs <page-url>');
  browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync'],
    timeout: TIMEOUT,
  });
  await run(browser, url);
} catch (e) {
  diag('failed:', e.stack || e.message);
  emit({ event: 'error', message: String(e.message).replace(/\u001b\[[0-9;]*m/g, '') });
  code = 1;
} finally {
  rl.close();
  if (browser) {
    const closing = browser.close().catch((e) => diag('browser close:', e.message));
    await Promise.race([closing, new Promise((r) => setTimeout(r, 10_000).unref())]);
  }
}
process.exit(code);
