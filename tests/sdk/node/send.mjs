// Sends identify/track/page/screen/group/alias with the official @segment/analytics-node SDK.
// Usage: node send.mjs <host URL> <write key> <tag>; prints {"errors": [...]} when done.
import { Analytics } from '@segment/analytics-node'

const [host, writeKey, tag] = process.argv.slice(2)
const errors = []
const analytics = new Analytics({ writeKey, host, flushAt: 3, maxRetries: 5 })
analytics.on('error', (err) => errors.push(String(err && (err.reason || err.message || err))))

const userId = `user-${tag}`
analytics.identify({ userId, traits: { plan: 'pro', seats: 3, beta: true } })
analytics.track({
  userId,
  event: 'Order Completed',
  properties: { amount: 42.5, items: [{ sku: 'a' }] },
  context: { campaign: { source: 'newsletter' } },
})
analytics.page({ userId, name: 'Pricing', properties: { url: 'https://example.com/pricing', n: 2 } })
analytics.screen({ userId, name: 'Home' })
analytics.group({ userId, groupId: `group-${tag}`, traits: { name: 'Acme', employees: 100 } })
analytics.alias({ userId, previousId: `anon-${tag}` })
await analytics.closeAndFlush({ timeout: 60000 })
console.log(JSON.stringify({ errors }))
