// The demo page in a real browser (Debian's Chromium, driven by
// playwright-core): two pages on two gateway nodes behind nginx, one room.
// A comment typed in one flies as danmaku in the other, likes add up in
// both, the online count says 2; then the first page's node shuts down
// gracefully, the page reconnects to the other node by itself and gets
// what was said while it was away, and the next comment.
//
// Run by tests/it/browser.rs, which starts Redis, the nodes and nginx, and
// sets LB_URL (nginx), NODE_PIDS ({"node id": pid}), CHROMIUM and SCREENSHOT.

import assert from 'node:assert/strict';

import { chromium } from 'playwright-core';

const { LB_URL, NODE_PIDS, CHROMIUM, SCREENSHOT } = process.env;
assert.ok(LB_URL && NODE_PIDS && CHROMIUM && SCREENSHOT, 'run by tests/it/browser.rs');
const pids = JSON.parse(NODE_PIDS);
const WAIT = 15000;

const browser = await chromium.launch({
  executablePath: CHROMIUM,
  args: ['--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage'],
});
try {
  const room = `live:e2e-${Date.now()}`;
  const open = async (name) => {
    const context = await browser.newContext({ viewport: { width: 1100, height: 720 } });
    const page = await context.newPage();
    const errors = [];
    page.on('pageerror', (e) => errors.push(e.message));
    await page.goto(`${LB_URL}/?room=${encodeURIComponent(room)}&name=${name}`);
    await page.waitForFunction(() => document.body.dataset.state === 'open', null, { timeout: WAIT });
    return { page, context, errors };
  };
  const ana = await open('ana');
  const bob = await open('bob');
  const node = (p) => p.page.evaluate(() => window.roomcast.node);
  const [anaNode, bobNode] = [await node(ana), await node(bob)];
  assert.notEqual(anaNode, bobNode, 'the two pages are on two nodes');

  const text = (p, id) => p.page.locator(`#${id}`).textContent();
  const until = (p, what, fn, arg) =>
    p.page.waitForFunction(fn, arg, { timeout: WAIT }).catch((e) => {
      throw new Error(`waiting for ${what}: ${e.message}`);
    });
  const chatHas = (p, line) =>
    until(p, `"${line}" in the chat`, (l) => [...document.querySelectorAll('#chat li.comment')].some((li) => li.textContent === l), line);

  // Online count: 2, in both.
  for (const p of [ana, bob]) await until(p, 'online 2', () => document.querySelector('#online').textContent === '2');

  // A comment typed in one page flies across the other.
  await ana.page.fill('#comment', 'hello from ana');
  await ana.page.press('#comment', 'Enter');
  await until(bob, 'the danmaku', () => [...document.querySelectorAll('#layer .danmaku')].some((d) => d.textContent === 'ana: hello from ana'));
  await chatHas(bob, 'ana: hello from ana');

  // Likes from one page: the aggregated count in both.
  for (let i = 0; i < 3; i++) await ana.page.click('#like');
  for (const p of [ana, bob]) await until(p, 'three likes', () => document.querySelector('#likes').textContent === '3');

  await bob.page.screenshot({ path: SCREENSHOT });

  // Ana's node shuts down gracefully. Her page goes offline for a moment
  // (so that what Bob says now can only reach her from history), then
  // reconnects through nginx to Bob's node by itself.
  await ana.page.evaluate(() => {
    window.recoveries = [];
    window.roomcast.on('recovered', (r) => window.recoveries.push(r.recovered));
  });
  process.kill(pids[anaNode], 'SIGTERM');
  await until(ana, 'the page to notice', () => document.body.dataset.state !== 'open');
  await ana.context.setOffline(true);
  await bob.page.fill('#comment', 'while you were away');
  await bob.page.press('#comment', 'Enter');
  await chatHas(bob, 'bob: while you were away');
  await ana.context.setOffline(false);
  await until(ana, 'the page to reconnect', () => document.body.dataset.state === 'open');
  assert.equal(await node(ana), bobNode, 'reconnected to the other node');
  await chatHas(ana, 'bob: while you were away');
  assert.deepEqual(await ana.page.evaluate(() => window.recoveries), [true], 'resumed from history');
  await bob.page.fill('#comment', 'welcome back');
  await bob.page.press('#comment', 'Enter');
  await chatHas(ana, 'bob: welcome back');
  for (const p of [ana, bob]) await until(p, 'online 2 again', () => document.querySelector('#online').textContent === '2');
  // Each comment once in Ana's chat (the history replay did not double any).
  const lines = await ana.page.evaluate(() => [...document.querySelectorAll('#chat li.comment')].map((li) => li.textContent));
  for (const line of ['ana: hello from ana', 'bob: while you were away', 'bob: welcome back']) {
    assert.equal(lines.filter((l) => l === line).length, 1, `${line} once: ${JSON.stringify(lines)}`);
  }
  assert.equal(await text(ana, 'state'), 'open');
  assert.deepEqual([...ana.errors, ...bob.errors], [], 'no script errors in the pages');
  console.log(`ok: pages on ${anaNode} and ${bobNode}; screenshot ${SCREENSHOT}`);
} finally {
  await browser.close();
}
